"""Who we accept mail for: hosted domains, valid recipients, address sanity.

Owns the answer to "may this RCPT TO path be relayed?" (SPEC "SMTP accept
side"): the domain must be one of `[domains.*]`; the local part must be in the
domain's `recipients` list or `recipients_file` when either is configured;
source routes, `%`-hacks, `!` paths, quoted local parts and a second `@` are
refused as relay attempts exactly like a foreign domain (Postfix with
`allow_untrusted_routing = no`). Also owns splitting an SMTP path from its
parameters, and re-reading a recipients file when it changes.

With `verify = "learned"` and no list, the domain's known recipients decide
(`verify.KnownRecipients`, an in-memory copy: no I/O at RCPT): known-invalid
gets `550 5.1.1`, known-valid is accepted, an unknown address follows
`unknown_recipient` (accepted, or `450 4.1.1`). With `verify = "callout"`
an unknown address is first asked of the next hop (`verdict`, through
`callouts.Callouts`, within the domain's `verify_timeout`): its answer decides
the same way. Each such check (once, with its final result), and each
decision of a list, is counted for `relay_recipient_checks_total`.

Parsing domains and addresses is `relay.core.address`'s; matching is on the
A-label form, so either spelling of a hosted domain is the same domain.
Refuses I/O beyond an occasional `os.stat`, reading a changed recipients
file and awaiting a callout, and refuses SMTP protocol state: `smtpd.py` decides when to ask and
what else to check (SMTPUTF8, limits, syntax of parameters).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from relay.core.address import AddressError, destination_key, host_key, parse_address
from relay.core.config import Config, DomainConfig
from relay.core.model import Reply
from relay.core.recipients import KnownState, Ttl
from relay.smtp.callouts import Callouts
from relay.smtp.verify import KnownRecipients

log = logging.getLogger("relay.smtp.policy")

# Characters that make a local part route somewhere else ("user%other@us",
# "other!user@us", "user@other@us") or hide such a route in quotes.
_ROUTING_CHARS = frozenset('%!@"')
# RFC 5321 atext plus "." (a dot-string); "%" and "!" are caught first above.
# Non-ASCII is allowed here: smtpd checks SMTPUTF8 before asking us.
_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\x80-\U0010ffff]+")
# An ORCPT value may be RFC 6533 utf-8-addr-unitext: raw UTF-8 (SMTPUTF8 only).
_PARAM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[!-<>-~]+)?"
                       r"|(?i:ORCPT)=[!-<>-~\x80-\U0010ffff]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_PATH = 256  # RFC 5321 4.5.3.1.3, without the angle brackets' slack


class PathSyntaxError(ValueError):
    """The argument of MAIL FROM / RCPT TO is not `<path> [params]`."""


def split_path(argument: str) -> tuple[str, list[str]]:
    """`<path> [SP params]` (or, leniently, a bare path) -> (path, params).

    The path is returned exactly as sent, without the angle brackets and with
    any source route kept: judging it is the caller's business. A `>` inside a
    quoted local part does not end the path.
    """
    text = argument.strip()
    if text.startswith("<"):
        quoted = escaped = False
        end = -1
        for i in range(1, len(text)):
            ch = text[i]
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = not quoted
            elif ch == ">" and not quoted:
                end = i
                break
        if end < 0:
            raise PathSyntaxError("missing '>'")
        path, rest = text[1:end], text[end + 1 :]
        if rest and not rest[0].isspace():
            raise PathSyntaxError("junk after '>'")
    else:
        path, _, rest = text.partition(" ")
        if not path or "<" in path or ">" in path:
            raise PathSyntaxError("bad path")
    if _CONTROL_RE.search(path) or len(path) > MAX_PATH:
        raise PathSyntaxError("bad characters in path")
    params = rest.split()
    if not all(_PARAM_RE.fullmatch(p) for p in params):
        raise PathSyntaxError("bad parameter")
    return path, params


def sender_address(path: str) -> str:
    """The envelope sender of `MAIL FROM:<path>`: "" for `<>`, source route dropped.

    RFC 5321 4.1.1.3/C: a server SHOULD ignore a source route in MAIL FROM; the
    sender is only where bounces go, so quoted local parts are fine here.
    Raises PathSyntaxError for anything that cannot receive a bounce.
    """
    if path.startswith("@"):
        _route, colon, path = path.partition(":")
        if not colon:
            raise PathSyntaxError("source route without ':'")
    if not path:
        return ""
    try:
        address = parse_address(path)
    except AddressError as exc:
        raise PathSyntaxError(f"sender must be local@domain: {exc}") from None
    local = address.local
    if " " in path and not (local.startswith('"') and local.endswith('"')):
        raise PathSyntaxError("space in sender")
    return path


def entry_key(entry: str) -> str:
    """A recipients-list entry as RCPT TO is matched against it: lower case,
    the domain of `local@domain` and `@domain` entries in A-label form."""
    local, at, domain = entry.lower().rpartition("@")
    return f"{local}@{destination_key(domain)}" if at else entry.lower()


def relay_denied(path: str) -> Reply:
    return Reply(554, f"5.7.1 <{path}>: Relay access denied")


def user_unknown(path: str) -> Reply:
    return Reply(550, f"5.1.1 <{path}>: Recipient address rejected: User unknown")


def unverified(path: str) -> Reply:
    return Reply(450, f"4.1.1 <{path}>: Recipient address rejected: unverified address")


def lookup_failure(path: str) -> Reply:
    return Reply(451, f"4.3.0 <{path}>: Temporary lookup failure")


def bad_recipient_syntax(path: str) -> Reply:
    return Reply(501, f"5.1.3 <{path}>: Bad recipient address syntax")


class RecipientsUnavailable(Exception):
    """The recipients file cannot be read: answer 4xx, never fall open."""


class RecipientFile:
    """One `recipients_file`, re-read when its inode, size or mtime change.

    `os.stat` runs at most once per `recheck_interval` seconds, so the hot
    path usually costs one clock read. Entries are the first word of each
    line, lower-cased; blank lines and lines starting with `#` are ignored
    (so Postfix `relay_recipients` files, "addr OK", work as they are).
    """

    def __init__(
        self, path: str, *, recheck_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._interval = recheck_interval
        self._monotonic = monotonic
        self._checked_at: float | None = None
        self._signature: tuple[int, int, int] | None = None
        self._entries: frozenset[str] = frozenset()
        self._error: str | None = None

    def entries(self) -> frozenset[str]:
        """The current entries; raises RecipientsUnavailable while unreadable."""
        now = self._monotonic()
        if self._checked_at is None or now - self._checked_at >= self._interval:
            self._checked_at = now
            self._refresh()
        if self._error is not None:
            raise RecipientsUnavailable(self._error)
        return self._entries

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            if signature == self._signature and self._error is None:
                return
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            message = f"recipients_file {self.path}: {_describe(exc)}"
            if message != self._error:
                log.error("%s; answering 451 for its domain until it is readable", message)
            self._error = message
            self._signature = None
            return
        entries = set()
        for line in text.splitlines():
            words = line.split(None, 1)
            if words and not words[0].startswith("#"):
                entries.add(entry_key(words[0]))
        if self._error is not None or self._signature is not None:
            log.info("recipients_file %s reloaded: %d entries", self.path, len(entries))
        self._entries = frozenset(entries)
        self._signature = signature
        self._error = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "not UTF-8 text"


_NO_TTL = Ttl(0.0, 0.0)


@dataclass(frozen=True, slots=True)
class _Ask:
    """Nothing is known of `key`: the next hop is to be asked (`callout`)."""

    rules: _Domain
    path: str  # as the client sent it
    address: str  # as the next hop is asked: the domain in A-label form
    key: str


@dataclass(frozen=True, slots=True)
class _Domain:
    name: str
    entries: frozenset[str]  # local parts, full addresses, or "@domain" for everyone
    file: RecipientFile | None
    learned: bool = False  # verify = "learned" or "callout" (decides only without a list)
    tempfail: bool = False  # unknown_recipient = "tempfail"
    ttl: Ttl = _NO_TTL
    callout: bool = False  # verify = "callout": an unknown address is asked of the next hop
    timeout: float = 10.0  # verify_timeout

    @property
    def accepts_anyone(self) -> bool:
        return self.file is None and not self.entries


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Policy:
    """Hosted domains and their recipients, built once from the config."""

    def __init__(
        self, config: Config, *, recheck_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        known: KnownRecipients | None = None,
        checked: Callable[[str], None] | None = None,
        now: Callable[[], datetime] = _utc_now,
        callouts: Callouts | None = None,
    ) -> None:
        """`known`: the learned recipients (without it, `verify` has no effect);
        `checked`: told each check's result (`valid`, `invalid`, `unknown`, `static`);
        `callouts`: the probes of `verify = "callout"` (without it, callout
        domains decide as `learned` ones)."""
        self._known = known if known is not None else KnownRecipients()
        self._callouts = callouts
        self._checked = checked or (lambda result: None)
        self._now = now
        self._domains = {
            name: self._domain(name, domain, recheck_interval, monotonic)
            for name, domain in config.domains.items()
        }

    @staticmethod
    def _domain(
        name: str, domain: DomainConfig, interval: float, monotonic: Callable[[], float]
    ) -> _Domain:
        file = (
            RecipientFile(domain.recipients_file, recheck_interval=interval, monotonic=monotonic)
            if domain.recipients_file else None
        )
        return _Domain(
            name, frozenset(entry_key(e) for e in domain.recipients), file,
            learned=domain.verify in ("learned", "callout"),
            tempfail=domain.unknown_recipient == "tempfail",
            ttl=Ttl(domain.verify_valid_ttl, domain.verify_invalid_ttl),
            callout=domain.verify == "callout", timeout=domain.verify_timeout,
        )

    @property
    def verifies(self) -> bool:
        """Some domain has `verify` on (the known recipients are worth keeping fresh)."""
        return any(d.learned for d in self._domains.values())

    @property
    def calls_out(self) -> bool:
        """Some domain has `verify = "callout"`."""
        return any(d.callout for d in self._domains.values())

    def hosted(self, domain: str) -> str | None:
        """The configured name of `domain` if we relay for it, else None."""
        key = host_key(domain)
        return key if key is not None and key in self._domains else None

    async def verdict(self, path: str) -> Reply | None:
        """`check_recipient`, with an unknown address of a callout domain
        first asked of its next hop (never longer than `verify_timeout`)."""
        judged = self._judge(path)
        if not isinstance(judged, _Ask):
            return judged
        assert self._callouts is not None
        state = await self._callouts.check(judged.address, judged.key, judged.rules.name,
                                           judged.rules.timeout)
        return self._decided(judged.rules, judged.path, state)

    def check_recipient(self, path: str) -> Reply | None:
        """None when `RCPT TO:<path>` may be accepted, else the reply to give;
        without asking anyone (an unknown address of a callout domain is unknown)."""
        judged = self._judge(path)
        if isinstance(judged, _Ask):
            return self._decided(judged.rules, judged.path, None)
        return judged

    def _judge(self, path: str) -> Reply | _Ask | None:
        """The reply, or that the next hop is to be asked.

        Relay attempts of every shape get the same 554 as a foreign domain, so
        that a prober learns nothing about which trick came closest.
        """
        if path.startswith("@") or '"' in path:
            return relay_denied(path)  # source route, or a quoted local part
        local, at, domain = path.rpartition("@")
        key = self.hosted(domain) if at else None
        if key is None or _ROUTING_CHARS.intersection(local):
            return relay_denied(path)
        if not _LOCAL_RE.fullmatch(local):
            return bad_recipient_syntax(path)
        rules = self._domains[key]
        if rules.accepts_anyone:
            return self._learned(rules, path, local, key) if rules.learned else None
        wanted = local.lower()
        full = f"{wanted}@{key}"
        self._checked("static")
        if wanted in rules.entries or full in rules.entries or f"@{key}" in rules.entries:
            return None
        if rules.file is not None:
            try:
                entries = rules.file.entries()
            except RecipientsUnavailable:
                return lookup_failure(path)
            if wanted in entries or full in entries or f"@{key}" in entries:
                return None
        return user_unknown(path)

    def _learned(self, rules: _Domain, path: str, local: str, domain: str) -> Reply | _Ask | None:
        """What the next hop taught about the address decides, or it is to be asked."""
        key = f"{local.lower()}@{domain}"
        state = self._known.state(key, rules.ttl, self._now())
        if state is None and rules.callout and self._callouts is not None:
            return _Ask(rules, path, f"{local}@{domain}", key)
        return self._decided(rules, path, state)

    def _decided(self, rules: _Domain, path: str, state: KnownState | None) -> Reply | None:
        """The reply for what is known (None: nothing), counted."""
        if state is KnownState.INVALID:
            self._checked("invalid")
            return user_unknown(path)
        if state is KnownState.VALID:
            self._checked("valid")
            return None
        self._checked("unknown")
        return unverified(path) if rules.tempfail else None
