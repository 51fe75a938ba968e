"""The SMTP accept side: aiosmtpd sessions that turn client mail into queue entries.

Owns everything a sending MTA sees from us (SPEC "SMTP accept side"): the
banner and EHLO keywords, MAIL/RCPT/DATA checks and their replies (all with
RFC 3463 enhanced status codes), the prepended `Received:` header, the
replies of the connection and message-rate limits, command and DATA
timeouts, STARTTLS, ETRN, and the rule that `250 ... queued as ID` is said
only after `submit` has returned, i.e. after the message is durably committed.

Refuses: deciding which addresses are valid (`policy.py`), counting clients
against the limits (`smtp_limits.py`), binding sockets and the order of a
shutdown (`listeners.py`), storing anything itself (the `submit` callable
does), AUTH (we never authenticate anyone), VRFY/EXPN (no address
harvesting), and reverse DNS (the Received header says `unknown`).

Replies chosen where SPEC leaves the wording to us (Postfix's where it has one):

* end of data, too big: `552 5.3.4 Message size exceeds fixed limit`
* end of data, a line over 998 octets: `554 5.6.0 Error: message line longer
  than 998 octets` (500 is not a valid answer to the end of data, RFC 5321
  4.3.2; 554 is "transaction failed")
* end of data, a NUL byte: `554 5.6.0 Error: NUL byte in message data`
* end of data, bare CR or LF: `550 5.5.2 Error: bare <CR> or <LF> in message
  data`; all of these are answered only after the terminating `.`, and the
  session goes on
* storage failure: `451 4.3.0 Error: queue file write error`
* ETRN: `250 2.0.0 Queuing for node D started`; `459 4.7.1 Node D not
  allowed: access denied` for clients outside `smtp.etrn_clients`; `458 4.1.0
  Unable to queue messages for node D: not a hosted domain`; `501 5.5.4
  Syntax: ETRN <domain>`. `@domain` is taken as `domain`; `#queue` gets the 458.
* timeouts: `421 4.4.2 <hostname> Error: timeout exceeded`, then close;
  `command_timeout`/`data_timeout` of 0 mean "no timeout". `data_timeout` is
  an idle timeout: a client that sends nothing for that long inside DATA is
  dropped (a slow but steady client is not).
* shutdown (`Listeners.close()`): `421 4.3.2 <hostname> Service shutting down`
  to idle sessions at once, and to sessions receiving or storing a message
  right after that message's reply. Once `smtp.shutdown_grace` has passed
  (`Listeners.stop_receiving()`), a session still receiving hears the 421
  mid-DATA and is closed: its message was never acknowledged, so its client
  sends it again later; one storing a message still hears its reply.
* connection limits, in the greeting: `421 4.7.0 <hostname> Error: too many
  connections from <ip>` (for the per-IP and the total limit alike)
* a non-ASCII address without `SMTPUTF8` in MAIL: `553 5.6.7 Error: non-ASCII
  address without SMTPUTF8` (RFC 6531 3.5); bytes that are not UTF-8: 501
* `RCPT TO:<postmaster>` without a domain is a relay attempt like any other
  (we deliver nothing locally).

Built on aiosmtpd 1.4's command loop; besides its documented hooks we override
`_handle_client` (refusing greeting), `_timeout_cb` (idle timeout in DATA, 421
before closing) and `_create_envelope`, and replace MAIL/RCPT/DATA outright:
stock aiosmtpd replies lack enhanced codes and its DATA keeps the command
timer running. `push` adds enhanced codes to the stock replies that remain.
Sessions are set up by `_init_smtp` instead of aiosmtpd's __init__, whose
introspection would otherwise run on every connection, and DATA is read in
bulk (`relay.smtp.data`) rather than a line per read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import functools
import inspect
import ipaddress
import logging
import re
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException, login_always_fail

from relay.core import maillog
from relay.core.clock import Clock
from relay.core.config import Config
from relay.queue.rows import NewMessage
from relay.smtp.data import LINE_TOO_LONG, TOO_BIG, DataReceiver, give_back
from relay.smtp.limits import ClientLimits
from relay.smtp.policy import PathSyntaxError, Policy, domain_key, sender_address, split_path

log = logging.getLogger("relay.smtp.server")

Submit = Callable[[NewMessage], Awaitable[None]]
OnEtrn = Callable[[str], Awaitable[object]]

IDENT = "ESMTP mx-relay"
MAX_HOPS = 50
NO_TIMEOUT = 10.0**9  # what a configured timeout of 0 means

BARE_CR_LF = "550 5.5.2 Error: bare <CR> or <LF> in message data"
NUL_BYTE = "554 5.6.0 Error: NUL byte in message data"
TOO_MANY_HOPS = "554 5.4.6 Too many hops"
STORAGE_FAILED = "451 4.3.0 Error: queue file write error"
INTERNAL_ERROR = "451 4.3.0 Error: internal error"
_WHOLE_BUFFER = sys.maxsize  # a read() this large empties the StreamReader's buffer

_DATA_PROBLEMS = {
    TOO_BIG: "message_size",
    LINE_TOO_LONG: "line_too_long",
    BARE_CR_LF: "bare_cr_lf",
    NUL_BYTE: "nul_byte",
    TOO_MANY_HOPS: "hops",
}
_POLICY_REASONS = {554: "relay_denied", 550: "unknown_recipient", 451: "lookup_failure",
                   501: "recipient_syntax"}

# Each "Received:" line of the header section; the search starts at the LF
# that ends our own Received header, so a literal "\n" leads the pattern.
_RECEIVED_RE = re.compile(rb"\n(?i:received)[ \t]*:")
_ENHANCED_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
# Enhanced codes for aiosmtpd's own replies that lack one (RFC 3463 classes).
_ENHANCED_DEFAULTS = {
    451: "4.3.0", 452: "4.3.1", 454: "4.7.0", 500: "5.5.2", 501: "5.5.4", 502: "5.5.1",
    503: "5.5.1", 504: "5.5.4", 530: "5.7.0", 552: "5.3.4", 553: "5.1.3", 554: "5.7.0",
    555: "5.5.4",
}
_ENHANCED_2XX = {"220 Ready to start TLS": "220 2.0.0 Ready to start TLS"}
_NOT_PRINTABLE = re.compile(r"[^!-~]")


def enhance(status: str) -> str:
    """Give a stock aiosmtpd reply an enhanced status code (RFC 2034).

    Our own replies already carry one. The greeting, EHLO/HELO lines and 354
    must not (RFC 2034 section 3), so only 4xx/5xx and known 2xx texts change.
    """
    if len(status) < 4 or not status[:3].isdigit():
        return status
    if status[0] not in "45":
        return _ENHANCED_2XX.get(status, status)
    text = status[4:]
    if _ENHANCED_RE.match(text):
        return status
    code = int(status[:3])
    return f"{status[:4]}{_ENHANCED_DEFAULTS.get(code, f'{status[0]}.0.0')} {text}"


def client_ip(peer: object) -> str:
    """The client's IP as text; IPv4-mapped IPv6 addresses as plain IPv4."""
    if not isinstance(peer, tuple) or not peer:
        return "unknown"
    return _normal_ip(str(peer[0]))


@functools.lru_cache(maxsize=4096)
def _normal_ip(host: str) -> str:
    """`client_ip` for a peer host; cached, as busy senders connect again and
    again from the same few addresses and parsing one is not free."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _printable(text: str, limit: int = 255) -> str:
    """Client-supplied text made safe for a header: printable ASCII, bounded."""
    return _NOT_PRINTABLE.sub("?", text[:limit]) or "unknown"


def _valid_utf8(text: str) -> bool:
    """False when the client sent bytes that are not UTF-8 (decoded as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SmtpMetrics(Protocol):
    """What we report to `relay.ops.metrics.Metrics` (relay_smtp_*)."""

    def accepted(self, messages: int = 1) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def session_started(self) -> None: ...
    def session_ended(self) -> None: ...


@dataclass
class SmtpStats:
    """Counters for the metrics endpoint (relay_smtp_*)."""

    accepted: int = 0
    rejections: collections.Counter[str] = field(default_factory=collections.Counter)


class Shared:
    """What every session of every listener shares: config, limits, bookkeeping."""

    def __init__(
        self, config: Config, policy: Policy, submit: Submit, id_factory: Callable[[], str],
        clock: Clock, on_etrn: OnEtrn | None, tls_context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop, metrics: SmtpMetrics | None,
    ) -> None:
        smtp = config.smtp
        self.config = config
        self.hostname = config.node.hostname
        self.shutting_down = f"421 4.3.2 {self.hostname} Service shutting down"
        self.policy = policy
        self.submit = submit
        self.id_factory = id_factory
        self.clock = clock
        self.on_etrn = on_etrn
        self.tls_context = tls_context
        self.loop = loop
        self.max_size = smtp.max_message_size
        self.command_timeout = smtp.command_timeout or NO_TIMEOUT
        self.data_timeout = smtp.data_timeout or NO_TIMEOUT
        self.etrn_networks = tuple(ipaddress.ip_network(n) for n in smtp.etrn_clients)
        self.handler = RelayHandler()  # stateless: one for every session
        self.handle_hooks = handle_hooks(self.handler)
        self.ehlo_hook_version = ehlo_hook_version(self.handle_hooks)
        self.stats = SmtpStats()
        self.metrics = metrics
        self.closing = False
        self.protocols: set[RelaySMTP] = set()  # every live connection, refused ones too
        self.limits = ClientLimits(smtp.max_connections, smtp.max_connections_per_ip,
                                   smtp.max_messages_per_ip_per_minute, clock)
        self.finishing: set[asyncio.Future[Any]] = set()  # handler tasks and submits
        self.idle = asyncio.Event()
        self.idle.set()

    def reject(self, reason: str) -> None:
        self.stats.rejections[reason] += 1
        if self.metrics is not None:
            self.metrics.rejected(reason)

    def accepted(self) -> None:
        self.stats.accepted += 1
        if self.metrics is not None:
            self.metrics.accepted()

    def admit(self, proto: RelaySMTP) -> str | None:
        """Count a new connection in, or return the 421 greeting that refuses it."""
        self.protocols.add(proto)
        self.idle.clear()
        ip = proto.client_ip
        if self.closing:
            return self.shutting_down
        if not self.limits.connect(ip):
            self.reject("connection_limit")
            return f"421 4.7.0 {self.hostname} Error: too many connections from {ip}"
        proto.admitted = True
        if self.metrics is not None:
            self.metrics.session_started()
        return None

    def release(self, proto: RelaySMTP) -> None:
        """Forget a closed connection (safe to call twice)."""
        if proto not in self.protocols:
            return
        self.protocols.discard(proto)
        if proto.admitted:
            self.limits.disconnect(proto.client_ip)
            if self.metrics is not None:
                self.metrics.session_ended()
        self.keep(proto.handler_task)
        if not self.protocols:
            self.idle.set()

    def keep(self, future: asyncio.Future[Any] | None) -> None:
        """Remember a task that must finish before wait_closed() returns."""
        if future is None or future.done():
            return
        self.finishing.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self.finishing.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: the session logged it if it still cared

    def etrn_allowed(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.etrn_networks)

    async def store(self, message: NewMessage) -> None:
        """Submit, shielded: a client hanging up must not cut a commit in half."""
        task = asyncio.ensure_future(self.submit(message))
        self.keep(task)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(_orphan_outcome, message.id))
            raise


def _orphan_outcome(queue_id: str, task: asyncio.Future[None]) -> None:
    """Log how a commit ended whose client left before hearing the answer."""
    if task.cancelled() or task.exception() is not None:
        log.warning("%s: client went away during the commit, which failed; nothing kept",
                    queue_id)
    else:
        log.warning("%s: client went away during the commit, which succeeded; it will be "
                    "delivered, and a retry by the client will duplicate it", queue_id)


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus what we learn at MAIL and RCPT."""

    def __init__(self) -> None:
        super().__init__()
        self.body_8bitmime = False
        self.rcpt_keys: set[str] = set()


class RelayHandler:
    """aiosmtpd hooks for the replies that have a hook: EHLO, NOOP, RSET, QUIT."""

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the "new" hook form leaves this to us
        assert isinstance(server, RelaySMTP)
        return server.ehlo_lines()

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: Envelope,
                          arg: str) -> str:
        return "250 2.0.0 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Bye"


def handle_hooks(handler: object) -> dict[str, Callable[..., Any]]:
    """The handler's `handle_*` hooks by verb, as aiosmtpd's SMTP.__init__ finds them."""
    return {name.replace("handle_", ""): getattr(handler, name)
            for name in dir(handler) if name.startswith("handle_")}


def ehlo_hook_version(hooks: dict[str, Callable[..., Any]]) -> str:
    """aiosmtpd's `_ehlo_hook_ver`: the 5-argument ("new") handle_EHLO is the one
    whose returned lines replace the stock EHLO reply."""
    if len(inspect.signature(hooks["EHLO"]).parameters) != 5:
        raise TypeError("handle_EHLO must take (server, session, envelope, hostname, responses)")
    return "new"


@functools.cache
def _smtp_verbs(cls: type[SMTP]) -> tuple[tuple[str, str], ...]:
    """(verb, method name) of every `smtp_*` method of `cls` but AUTH, which we
    never offer (so it is "not recognized"); found once per class, not per session."""
    return tuple((name.replace("smtp_", ""), name) for name in dir(cls)
                 if name.startswith("smtp_") and name != "smtp_AUTH")


class RelaySMTP(SMTP):
    """One client connection. aiosmtpd parses commands; the verbs that decide
    anything (MAIL, RCPT, DATA, ETRN) are ours, with our replies."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self.client_ip = "unknown"
        self.admitted = False
        self.handler_task: asyncio.Task[None] | None = None
        self._refusal: str | None = None
        self._in_data = False
        self._busy = False  # receiving or storing a message: close() lets it finish
        self._data_seen = 0.0
        self._continued: list[bytes] = []  # lines of a multi-line reply not sent yet
        self._init_smtp(shared)

    def _init_smtp(self, shared: Shared) -> None:
        """Set every attribute aiosmtpd's SMTP.__init__ sets, as it would for our
        arguments (no AUTH, no PROXY, no call limits, SMTPUTF8 on, raw bytes).

        The stock __init__ runs inspect.getmembers, dir and inspect.signature
        on the session and its handler for every connection; the verb and hook
        tables here are found once (`_smtp_verbs`, `Shared`) and only bound
        per session. tests/unit/test_smtpd_fastpath.py compares the result
        with the stock __init__'s, attribute by attribute.
        """
        loop = shared.loop
        self.__ident__ = IDENT
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = shared.handler
        self.data_size_limit = shared.max_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        # aiosmtpd keeps this dict on the class, shared by every session; EHLO
        # grows it. A per-session copy keeps sessions independent.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.hostname = shared.hostname
        self.tls_context = shared.tls_context
        self.require_starttls = False
        self._timeout_duration = shared.command_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {}
        self._handle_hooks = dict(shared.handle_hooks)
        self._ehlo_hook_ver = shared.ehlo_hook_version
        self._smtp_methods = {verb: getattr(self, name) for verb, name in _smtp_verbs(type(self))}
        self._enforce_call_limit = False

    # -- connection lifetime ------------------------------------------------

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    def _envelope(self) -> RelayEnvelope:
        assert isinstance(self.envelope, RelayEnvelope)
        return self.envelope

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # not the STARTTLS layer arriving
        super().connection_made(transport)
        if first:
            self.client_ip = client_ip(transport.get_extra_info("peername"))
            self.handler_task = self._handler_coroutine
            self._refusal = self._shared.admit(self)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._shared.release(self)

    async def _handle_client(self) -> None:
        if self._refusal is None:
            await super()._handle_client()
            return
        maillog.rejected(self.client_ip, "CONNECT", self._refusal)
        with contextlib.suppress(ConnectionError):
            await self.push(self._refusal)
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        if self._in_data:
            idle = self.loop.time() - self._data_seen
            if idle < self._shared.data_timeout:
                self._timeout_handle = self.loop.call_later(
                    self._shared.data_timeout - idle, self._timeout_cb
                )
                return
        log.info("timeout %s from [%s]", "in DATA" if self._in_data else "waiting for a command",
                 self.client_ip)
        self._shared.reject("timeout")
        self._say_goodbye(f"421 4.4.2 {self.hostname} Error: timeout exceeded")
        super()._timeout_cb()

    def _say_goodbye(self, reply: str) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            # uvloop's transports write like asyncio.WriteTransport without
            # inheriting from it: no isinstance check here.
            cast(asyncio.WriteTransport, transport).write(reply.encode("ascii") + b"\r\n")
            transport.close()

    def shutdown(self) -> None:
        """Listeners.close(): end this session now, or after the message in hand."""
        if not self._busy:
            self._say_goodbye(self._shared.shutting_down)

    def stop_receiving(self) -> None:
        """Listeners.stop_receiving(): drop the message still arriving, if any
        (nothing of it is kept); a message being stored is not touched."""
        if self._in_data:
            self._say_goodbye(self._shared.shutting_down)

    async def push(self, status: str | bytes) -> None:
        """Send one reply line; the lines of a multi-line reply ("250-...") wait
        for its last one and go out together: one write, one segment, where
        aiosmtpd's EHLO would make one per line."""
        if isinstance(status, str):
            if "\r" in status or "\n" in status:  # echoed client text must not split a reply
                status = status.replace("\r", "?").replace("\n", "?")
            status = enhance(status).encode("utf-8", "replace")
        if status[3:4] == b"-":
            self._continued.append(status)
            return
        if self._continued:
            self._continued.append(status)
            status = b"\r\n".join(self._continued)
            self._continued.clear()
        await super().push(status)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # routine on the internet: no traceback
            log.info("TLS handshake with [%s] failed: %s", self.client_ip, error.__cause__)
            return INTERNAL_ERROR  # aiosmtpd closes the connection without sending it
        log.error("session from [%s]: unexpected error", self.client_ip, exc_info=error)
        self._set_rset_state()
        return INTERNAL_ERROR

    # -- EHLO and the verbs we do not offer -----------------------------------

    def ehlo_lines(self) -> list[str]:
        keywords = [f"SIZE {self._shared.max_size}", "8BITMIME", "PIPELINING",
                    "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self.tls_context is not None and self._tls_protocol is None:
            keywords.append("STARTTLS")
        lines = [self.hostname, *keywords]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def smtp_HELP(self, arg: str) -> None:
        verbs = "DATA EHLO ETRN HELO HELP MAIL NOOP QUIT RCPT RSET"
        if self.tls_context is not None:
            verbs += " STARTTLS"
        await self.push(f"214 2.0.0 Commands: {verbs}")

    async def smtp_VRFY(self, arg: str) -> None:
        await self.push("502 5.5.1 VRFY command is disabled")

    async def smtp_EXPN(self, arg: str) -> None:
        await self.push("502 5.5.1 EXPN command is disabled")

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_context is None:
            await self.push("502 5.5.1 Error: command not implemented")
        elif self._tls_protocol is not None:
            await self.push("503 5.5.1 Error: TLS already active")
        elif arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
        else:
            await super().smtp_STARTTLS(arg)

    # -- the mail transaction ------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None
        envelope = self._envelope()
        syntax = "501 5.5.4 Syntax: MAIL FROM:<address>"
        if envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        rest = self._strip_command_keyword("FROM:", arg) if arg else None
        if not rest:
            await self.push(syntax)
            return
        try:
            path, params = split_path(rest)
            sender = sender_address(path)
        except PathSyntaxError:
            await self.push("501 5.1.7 Bad sender address syntax")
            return
        if params and not self.session.extended_smtp:
            await self.push(syntax)
            return
        size = 0
        body_8bitmime = smtputf8 = False
        for param in params:
            key, eq, value = param.partition("=")
            key = key.upper()
            if key == "SIZE" and value.isdigit():
                size = int(value)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                body_8bitmime = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8" and not eq:
                smtputf8 = True
            elif key in ("SIZE", "BODY", "SMTPUTF8"):
                await self.push(f"501 5.5.4 Bad {key} parameter")
                return
            else:
                await self.push(f"555 5.5.4 Unsupported option: {key}")
                return
        if size > self._shared.max_size:
            await self._refuse("message_size", "MAIL", TOO_BIG, sender)
            return
        if not _valid_utf8(sender):
            await self.push("501 5.1.7 Bad sender address syntax")
            return
        if not smtputf8 and not sender.isascii():
            await self._refuse("smtputf8", "MAIL",
                               "553 5.6.7 Error: non-ASCII address without SMTPUTF8", sender)
            return
        if not self._shared.limits.allow_message(self.client_ip):
            await self._refuse("rate_limit", "MAIL",
                               f"450 4.7.1 Error: too much mail from {self.client_ip}", sender)
            return
        envelope.mail_from = sender
        envelope.mail_options.extend(p.upper() for p in params)
        envelope.smtp_utf8 = smtputf8
        envelope.body_8bitmime = body_8bitmime
        await self.push("250 2.1.0 Ok")

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None
        envelope = self._envelope()
        if envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        rest = self._strip_command_keyword("TO:", arg) if arg else None
        if not rest:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        sender = envelope.mail_from
        if len(envelope.rcpt_tos) >= self._shared.config.smtp.max_recipients:
            await self._refuse("too_many_recipients", "RCPT",
                               "452 4.5.3 Error: too many recipients", sender)
            return
        try:
            path, params = split_path(rest)
        except PathSyntaxError:
            await self._refuse("recipient_syntax", "RCPT",
                               "501 5.1.3 Bad recipient address syntax", sender)
            return
        if params:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>" if not self.session.extended_smtp
                            else f"555 5.5.4 Unsupported option: {params[0].partition('=')[0]}")
            return
        if not _valid_utf8(path):
            await self._refuse("recipient_syntax", "RCPT",
                               "501 5.1.3 Bad recipient address syntax", sender)
            return
        if not envelope.smtp_utf8 and not path.isascii():
            await self._refuse("smtputf8", "RCPT",
                               "553 5.6.7 Error: non-ASCII address without SMTPUTF8", sender)
            return
        verdict = self._shared.policy.check_recipient(path)
        if verdict is not None:
            reason = _POLICY_REASONS.get(verdict.code, "recipient")
            await self._refuse(reason, "RCPT", str(verdict), sender, path)
            return
        key = path.lower()
        if key not in envelope.rcpt_keys:  # the same mailbox twice is delivered once
            envelope.rcpt_keys.add(key)
            envelope.rcpt_tos.append(path)
        await self.push("250 2.1.5 Ok")

    async def _refuse(self, reason: str, stage: str, reply: str, sender: str = "",
                      recipient: str = "") -> None:
        self._shared.reject(reason)
        maillog.rejected(self.client_ip, stage, reply, sender, recipient)
        await self.push(reply)

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        envelope = self._envelope()
        if envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not envelope.rcpt_tos:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self._busy = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            received = await self._read_data()
            if received is None:
                return  # the client went away
            blocks, problem = received
            if problem is None:
                reply = await self._accept(envelope, blocks)
            else:
                await self._refuse(_DATA_PROBLEMS[problem], "DATA", problem,
                                   envelope.mail_from or "", ",".join(envelope.rcpt_tos))
                reply = ""
            self._set_post_data_state()
            if reply:
                await self.push(reply)
        finally:
            self._busy = False
        if self._shared.closing:
            self._say_goodbye(self._shared.shutting_down)

    async def _read_data(self) -> tuple[list[bytes], str | None] | None:
        """Read up to `<CRLF>.<CRLF>`: the unstuffed data in blocks of whole lines
        (index 0 left free for our Received header), or the reply that will
        reject them; None if the client went away first.

        Only CRLF ends a line, so a bare LF or CR stays inside one for
        `_accept` to find, and `\\n.\\r\\n` never ends the data. After a problem
        the rest is drained, never stored, and answered once the client is done.
        Reads take all that has arrived (not a line at a time); what follows the
        final dot goes back to the reader for the command loop.
        """
        reader = self._reader
        clock = self.loop.time
        receiver = DataReceiver(self._shared.max_size)
        self._in_data = True
        self._data_seen = clock()
        self._reset_timeout(self._shared.data_timeout)
        try:
            while True:
                chunk = await reader.read(_WHOLE_BUFFER)
                if not chunk:
                    if self.transport is not None:
                        self.transport.close()
                    return None
                self._data_seen = clock()
                end = receiver.feed(chunk)
                if end >= 0:
                    give_back(reader, chunk[end:])
                    break
        finally:
            self._in_data = False
            if self.transport is not None:  # else the session is over: no new timer
                self._reset_timeout()
        return receiver.blocks, receiver.problem

    async def _accept(self, envelope: RelayEnvelope, blocks: list[bytes]) -> str:
        """Check the joined message once, then store it; the reply to the final dot."""
        shared = self._shared
        queue_id = shared.id_factory()
        now = shared.clock.now()
        blocks[0] = self._received_header(envelope, queue_id, now)
        start = len(blocks[0])
        data = b"".join(blocks)
        blocks.clear()
        problem = None
        ends = data.count(b"\r\n", start)  # each line's own CRLF: any other CR or LF is bare
        if data.count(b"\n", start) != ends or data.count(b"\r", start) != ends:
            problem = BARE_CR_LF
        elif data.find(b"\x00", start) >= 0:
            problem = NUL_BYTE
        elif _count_received(data, start) > MAX_HOPS:
            problem = TOO_MANY_HOPS
        sender = envelope.mail_from or ""
        recipients = tuple(envelope.rcpt_tos)
        if problem is not None:
            await self._refuse(_DATA_PROBLEMS[problem], "DATA", problem, sender,
                               ",".join(recipients))
            return ""
        assert self.session is not None
        message = NewMessage(
            id=queue_id,
            sender=sender,
            recipients=recipients,
            data=data,
            received_at=now,
            client_address=self.client_ip,
            client_helo=_printable(self.session.host_name or ""),
            smtputf8=envelope.smtp_utf8,
            eightbit=envelope.body_8bitmime or not data.isascii(),
        )
        try:
            await shared.store(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("%s: not queued, storage failed: %s", queue_id, exc, exc_info=exc)
            shared.reject("storage")
            maillog.rejected(self.client_ip, "DATA", STORAGE_FAILED, sender, ",".join(recipients))
            return STORAGE_FAILED
        shared.accepted()
        maillog.queued(queue_id, sender, recipients, len(data), self.client_ip,
                       message.client_helo)
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _received_header(self, envelope: RelayEnvelope, queue_id: str, now: datetime) -> bytes:
        assert self.session is not None
        helo = _printable(self.session.host_name or "")
        ip = self.client_ip
        literal = f"IPv6:{ip}" if ":" in ip else ip
        if not self.session.extended_smtp:
            protocol = "SMTP"
        else:
            protocol = "ESMTPS" if self.session.ssl is not None else "ESMTP"
        date = email.utils.format_datetime(now)
        head = (f"Received: from {helo} (unknown [{literal}])\r\n"
                f"\tby {self.hostname} (mx-relay) with {protocol} id {queue_id}")
        if len(envelope.rcpt_tos) == 1:
            tail = f"\r\n\tfor <{envelope.rcpt_tos[0]}>; {date}\r\n"
        else:
            tail = f";\r\n\t{date}\r\n"
        return (head + tail).encode("utf-8")

    # -- ETRN (RFC 1985) -----------------------------------------------------

    async def smtp_ETRN(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        shared = self._shared
        if self._envelope().mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        node = (arg or "").strip()
        name = node[1:] if node[:1] in ("@", "#") else node
        if not name.isascii() or domain_key(name) is None:
            await self.push("501 5.5.4 Syntax: ETRN <domain>")
            return
        if not shared.etrn_allowed(self.client_ip):
            await self._refuse("etrn", "ETRN", f"459 4.7.1 Node {node} not allowed: access denied")
            return
        domain = None if node.startswith("#") else shared.policy.hosted(name)
        if domain is None:
            await self.push(f"458 4.1.0 Unable to queue messages for node {node}: "
                            "not a hosted domain")
            return
        if shared.on_etrn is None:
            await self.push(f"458 4.3.0 Unable to queue messages for node {node}")
            return
        try:
            await shared.on_etrn(domain)
        except Exception as exc:
            log.error("ETRN %s from [%s] failed: %s", domain, self.client_ip, exc, exc_info=exc)
            await self.push(f"458 4.3.0 Unable to queue messages for node {node}")
            return
        log.info("ETRN %s from [%s]: queue flushed", domain, self.client_ip)
        await self.push(f"250 2.0.0 Queuing for node {node} started")


def _count_received(data: bytes, start: int) -> int:
    """Received: headers in the header section (stops counting past the limit)."""
    end = data.find(b"\r\n\r\n", start - 2)
    end = len(data) if end < 0 else end + 2
    count = 0
    for _ in _RECEIVED_RE.finditer(data, start - 1, end):
        count += 1
        if count > MAX_HOPS:
            break
    return count
