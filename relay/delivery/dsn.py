"""Build RFC 3464 delivery status notifications: bounces and delay warnings.

Owns the bytes of the DSN the relay sends from the null sender to a message's
envelope sender: a multipart/report (RFC 6522) with a human explanation, a
message/delivery-status part (RFC 3464) and the original header section, with
CRLF line endings, lines of at most 998 octets (RFC 5322 2.1.1) and a 7-bit
body, so any MX that accepts mail can take it.

It carries the RFC 3461 parameters it is given: ENVID as
`Original-Envelope-Id`, ORCPT as `Original-Recipient`, and RET: the whole
original comes back (message/rfc822) only in a failure report with
RET=FULL; otherwise, and when the original cannot go whole (a NUL, a line
over 998 octets), its header section. About a message received with
SMTPUTF8 whose addresses or headers are UTF-8 it uses RFC 6533's types:
message/global-delivery-status (addresses as utf-8-addr-unitext),
message/global-headers and message/global, in 8bit; the report then needs
SMTPUTF8 (and 8BITMIME) on the way back, as the original did.

Refuses everything else: no I/O and no clock ("now" is a parameter), no
decision about *whether* to notify (null senders, NOTIFY=, which recipients)
and no queueing; it refuses a null sender: a bounce of a bounce is the
caller's bug.
"""

from __future__ import annotations

import binascii
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Literal

from relay.core.model import Reply

__all__ = ["Action", "Dsn", "RecipientNotice", "build_dsn"]

Action = Literal["failed", "delayed", "relayed"]

_CRLF = "\r\n"
_SOFT_WIDTH = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
_HARD_WIDTH = 998  # RFC 5322 2.1.1: lines MUST be at most 998 octets
# Queue ids, DSN ids and host names: a dot-atom (RFC 5322 3.2.3) that is also a
# valid boundary tail (RFC 2046 5.1.1) and a DNS-ish name.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")  # RFC 3463, ASCII digits only
_HEADER_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # field-name ":" (RFC 5322 3.6.8)
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class RecipientNotice:
    """What the sender is told about one recipient."""

    address: str  # the recipient as the relay accepted it (RCPT TO, no brackets)
    action: Action
    reply: Reply  # the reply that decided it: remote, or one the relay made up
    remote_mta: str | None = None  # host that gave the reply; None for local failures
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None  # only reported for "delayed"
    original_recipient: tuple[str, str] | None = None  # ORCPT: (addr-type, decoded address)


@dataclass(frozen=True, slots=True)
class Dsn:
    """A built DSN and what the transport must negotiate to send it.

    The data holds 8-bit octets only when the envelope sender (the To:
    field) is an internationalized address, or a part is one of RFC 6533's
    UTF-8 types or an 8-bit original: then the DSN needs SMTPUTF8 (or
    8BITMIME) as the original did.
    """

    data: bytes
    smtputf8: bool
    eightbit: bool


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    queue_id: str,
    dsn_id: str,
    arrival: datetime,
    now: datetime,
    notices: Sequence[RecipientNotice],
    original: bytes,
    envid: str | None = None,
    ret: str | None = None,
    smtputf8: bool = False,
) -> Dsn:
    """Build the DSN telling `original_sender` about `notices`.

    `original` is the stored message; only its header section is returned
    unless `ret` is "FULL" and some recipient failed. `envid` is the decoded
    ENVID; `smtputf8`: the original came with SMTPUTF8 (RFC 6533 types allowed).
    Raises ValueError for inputs that would make a malformed or looping DSN:
    a null or control-character sender, ids or host names that are not plain
    tokens, naive datetimes, no notices, or an unknown action.
    """
    _check_token("reporting_mta", reporting_mta)
    _check_token("queue_id", queue_id)
    _check_token("dsn_id", dsn_id)
    _check_sender(original_sender)
    if not notices:
        raise ValueError("a DSN needs at least one recipient notice")
    for when in (arrival, now):
        _check_aware(when)
    for notice in notices:
        if notice.action not in ("failed", "delayed", "relayed"):
            raise ValueError(f"unknown DSN action {notice.action!r}")
        for optional in (notice.last_attempt, notice.will_retry_until):
            if optional is not None:
                _check_aware(optional)

    if envid is not None and not all(0x20 <= ord(c) < 0x7F for c in envid):
        raise ValueError(f"envid must be printable ASCII, got {envid!r}")

    failed = any(n.action == "failed" for n in notices)
    if failed:
        subject = "Undelivered Mail Returned to Sender"
    elif any(n.action == "delayed" for n in notices):
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Successful Mail Delivery Report"
    unicode = smtputf8 and _needs_global(notices, original)
    parts = [
        _text_part(reporting_mta, notices),
        _status_part(reporting_mta, queue_id, arrival, notices, envid, unicode),
        _returned_part(original, unicode, whole=failed and ret == "FULL"),
    ]
    boundary = _boundary(dsn_id, parts)

    top = [
        *_fold("From", f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
        *_fold("To", f"<{original_sender}>"),
        *_fold("Subject", subject),
        *_fold("Date", format_datetime(now)),
        *_fold("Message-ID", f"<{dsn_id}@{reporting_mta}>"),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    out = bytearray(_CRLF.join(top).encode("utf-8"))
    out += b"\r\n\r\nThis is a MIME-encapsulated message.\r\n"
    for part in parts:
        out += b"\r\n--" + boundary.encode("ascii") + b"\r\n" + part
    out += b"\r\n--" + boundary.encode("ascii") + b"--\r\n"
    data = bytes(out)
    return Dsn(
        data=data,
        smtputf8=unicode or not original_sender.isascii(),
        eightbit=not data.isascii(),
    )


# -- validation ---------------------------------------------------------------


def _check_token(name: str, value: str) -> None:
    """Ids and host names go into Message-ID, Reporting-MTA and the boundary."""
    if not _TOKEN.fullmatch(value) or len(value) > 253:
        raise ValueError(f"{name} must be a plain ASCII token, got {value!r}")


def _check_sender(sender: str) -> None:
    """The sender goes into To: as is, so it must not break the header."""
    if not sender:
        raise ValueError("never send a DSN to the null sender")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in sender):
        raise ValueError(f"control character in sender {sender!r}")
    try:
        sender.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"sender is not valid Unicode: {sender!r}") from exc


def _check_aware(when: datetime) -> None:
    """A naive datetime would print as -0000 and hide a time zone bug."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware, got {when!r}")


# -- header fields ------------------------------------------------------------


def _ascii_text(text: str) -> str:
    """Printable ASCII for a header: controls become spaces, others \\x{HEX}.

    The escape is RFC 6533's EmbeddedUnicodeChar, so nothing is lost and a
    CR or LF from a remote reply can never start a field of its own.
    """
    out = []
    for c in text:
        code = ord(c)
        if 0x20 <= code < 0x7F:
            out.append(c)
        elif code < 0x20 or code == 0x7F:
            out.append(" ")
        else:
            out.append(f"\\x{{{code:X}}}")
    return "".join(out).strip()


def _fold(name: str, value: str) -> list[str]:
    """One header field as lines: folded at whitespace near 78 characters.

    Folding only before existing whitespace keeps the unfolded value exact. A
    single word too long for a 998-octet line is cut, adding a space: only
    absurd input (no real address or reply is that long) pays that price.
    """
    words = re.findall(r"[ \t]*[^ \t]+", value.strip(" \t"))
    lines: list[str] = []
    current = f"{name}:"
    for index, word in enumerate(words):
        piece = " " + word if index == 0 else word
        if index > 0 and len(current) + len(piece) > _SOFT_WIDTH:
            lines.append(current)
            current = piece
        else:
            current += piece
        while len(current.encode("utf-8")) > _HARD_WIDTH:
            cut = _HARD_WIDTH
            while len(current[:cut].encode("utf-8")) > _HARD_WIDTH:
                cut -= 1
            lines.append(current[:cut])
            current = " " + current[cut:]
    lines.append(current)
    return lines


def _typed_address(address: str, unicode: bool = False) -> str:
    """An address with its RFC 3464 address type.

    Plain printable ASCII is `rfc822; addr`. Anything else (non-ASCII, spaces,
    controls) is `utf-8; ` in RFC 6533's utf-8-addr-xtext form, which escapes
    every character outside QCHAR as \\x{HEX} and so round-trips exactly;
    with `unicode` (message/global-delivery-status) in its utf-8-addr-unitext
    form, which keeps non-ASCII characters as they are.
    """
    if address and all(0x21 <= ord(c) <= 0x7E for c in address):
        return f"rfc822; {address}"
    escaped = "".join(
        c if (0x21 <= ord(c) <= 0x7E and c not in "\\+=") or (unicode and ord(c) > 0x9F)
        else f"\\x{{{ord(c):X}}}" for c in address
    )
    return f"utf-8; {escaped}"


def _original_recipient(kind: str, address: str, unicode: bool) -> str:
    """Original-Recipient: ORCPT's type and its decoded address (RFC 3464 2.3.1)."""
    if kind == "rfc822" and address and all(0x21 <= ord(c) <= 0x7E for c in address):
        return f"rfc822; {address}"
    return _typed_address(address, unicode)


def _needs_global(notices: Sequence[RecipientNotice], original: bytes) -> bool:
    """Does a UTF-8 address or header call for RFC 6533's types?"""
    addresses = [n.address for n in notices]
    addresses += [n.original_recipient[1] for n in notices if n.original_recipient]
    if not all(a.isascii() for a in addresses):
        return True
    raw = b"".join(_header_section(original))
    return not raw.isascii() and _is_utf8(raw)


def _remote_host(remote_mta: str | None) -> str | None:
    """A DNS name for Remote-MTA, or None: "host[ip]:port" keeps only host."""
    if remote_mta is None:
        return None
    host = remote_mta.split("[", 1)[0].strip().rstrip(".")
    return host if _TOKEN.fullmatch(host) else None


def _status(notice: RecipientNotice) -> str:
    """The RFC 3463 status: class 5 for failed, class 4 for delayed, always.

    A failure that follows a temporary reply means the relay gave up on
    retrying, which RFC 3463 names 5.4.7 (delivery time expired).
    """
    reply = notice.reply
    status = reply.enhanced_status
    if not _STATUS.fullmatch(status):  # Reply.enhanced_status accepts any Unicode digit
        status = {4: "4.0.0", 5: "5.0.0"}.get(reply.code // 100, "4.0.0")
    if notice.action == "relayed":  # handed on: success as far as we go
        return status if status[0] == "2" else "2.0.0"
    if notice.action == "failed":
        if status[0] == "5":
            return status
        return "5" + status[1:] if reply.code // 100 == 5 else "5.4.7"
    if status[0] == "4":
        return status
    return "4" + status[1:] if status[0] == "5" else "4.0.0"


def _diagnostic(notice: RecipientNotice) -> str:
    """`smtp;` only for a reply a remote SMTP server gave (RFC 3464 2.3.6)."""
    kind = "smtp" if _remote_host(notice.remote_mta) else "X-mx-relay"
    return f"{kind}; {_ascii_text(str(notice.reply))}"


# -- the three parts ----------------------------------------------------------


def _part(headers: list[str], body: bytes) -> bytes:
    """A MIME body part: its header lines, a blank line, then the body."""
    return (_CRLF.join(headers) + _CRLF + _CRLF).encode("ascii") + body


def _text_part(reporting_mta: str, notices: Sequence[RecipientNotice]) -> bytes:
    """Part 1: what happened, for a person."""
    failed = [n for n in notices if n.action == "failed"]
    delayed = [n for n in notices if n.action == "delayed"]
    # (paragraph, indent of its continuation lines): recipients hang indented.
    paragraphs = [(f"This is the mail system at host {reporting_mta}.", "")]
    if failed:
        paragraphs += [
            (
                "I am sorry to tell you that your message could not be delivered to"
                " one or more of its recipients. The problem is permanent, so the"
                " mail system has stopped trying. Each of those recipients is listed"
                " below with the reply that decided it; the headers of your message"
                " are attached.",
                "",
            ),
            ("If you need help, please forward this report to your postmaster.", ""),
            *((_describe(n), "    ") for n in failed),
        ]
    if delayed:
        paragraphs += [
            ("*** This is a warning only: you do not need to send your message again. ***", ""),
            (
                "Your message has not been delivered yet to one or more of its"
                " recipients. The mail system will keep trying and will tell you if"
                " it has to give up. Each of those recipients is listed below with"
                " the most recent reply.",
                "",
            ),
            *((_describe(n), "    ") for n in delayed),
        ]
    relayed = [n for n in notices if n.action == "relayed"]
    if relayed:
        paragraphs += [
            (
                "Your message was passed on to the next mail system for the recipients"
                " listed below, as you asked to be told. That system does not send"
                " delivery notices, so you will hear nothing more about them from it.",
                "",
            ),
            *((_describe(n), "    ") for n in relayed),
        ]
    lines: list[str] = []
    for paragraph, indent in paragraphs:
        if lines:
            lines.append("")
        lines += textwrap.wrap(
            paragraph,
            width=76,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    text = _CRLF.join(lines) + _CRLF
    raw = text.encode("utf-8", errors="replace")
    if raw.isascii() and _fits(lines):
        return _part(
            ["Content-Description: Notification", "Content-Type: text/plain; charset=us-ascii"],
            raw,
        )
    return _part(
        [
            "Content-Description: Notification",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
        ],
        _quoted_printable([line.encode("utf-8", errors="replace") for line in lines]),
    )


def _describe(notice: RecipientNotice) -> str:
    """One recipient for the human part, in Postfix's familiar shape."""
    text = _human(str(notice.reply))
    host = _remote_host(notice.remote_mta)
    said = f"host {host} said: {text}" if host else text
    if notice.action == "failed" and notice.reply.code // 100 != 5:
        said = f"gave up after temporary failures; the last was: {said}"
    if notice.action == "delayed" and notice.will_retry_until is not None:
        said += f" (will retry until {format_datetime(notice.will_retry_until)})"
    return f"<{_human(notice.address)}>: {said}"


def _human(text: str) -> str:
    """Text for the human part: control characters and runs of space become one space."""
    return " ".join(
        "".join(" " if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c for c in text).split()
    )


def _status_part(
    reporting_mta: str,
    queue_id: str,
    arrival: datetime,
    notices: Sequence[RecipientNotice],
    envid: str | None = None,
    unicode: bool = False,
) -> bytes:
    """Part 2: message/delivery-status (message/global-delivery-status with
    `unicode`: RFC 6533), one field block per recipient."""
    blocks = [
        [
            *(_fold("Original-Envelope-Id", envid) if envid is not None else []),
            f"Reporting-MTA: dns; {reporting_mta}",
            f"X-Queue-ID: {queue_id}",
            f"Arrival-Date: {format_datetime(arrival)}",
        ]
    ]
    for notice in notices:
        block = []
        if notice.original_recipient is not None:
            block += _fold("Original-Recipient",
                           _original_recipient(*notice.original_recipient, unicode))
        block += [
            *_fold("Final-Recipient", _typed_address(notice.address, unicode)),
            f"Action: {notice.action}",
            f"Status: {_status(notice)}",
        ]
        host = _remote_host(notice.remote_mta)
        if host:
            block += _fold("Remote-MTA", f"dns; {host}")
        block += _fold("Diagnostic-Code", _diagnostic(notice))
        if notice.last_attempt is not None:
            block.append(f"Last-Attempt-Date: {format_datetime(notice.last_attempt)}")
        if notice.action == "delayed" and notice.will_retry_until is not None:
            block.append(f"Will-Retry-Until: {format_datetime(notice.will_retry_until)}")
        blocks.append(block)
    body = (_CRLF + _CRLF).join(_CRLF.join(block) for block in blocks) + _CRLF
    if unicode:
        return _part(["Content-Description: Delivery report",
                      "Content-Type: message/global-delivery-status",
                      "Content-Transfer-Encoding: 8bit"], body.encode("utf-8"))
    return _part(
        [
            "Content-Description: Delivery report",
            "Content-Type: message/delivery-status",
        ],
        body.encode("ascii"),
    )


def _header_section(original: bytes) -> list[bytes]:
    """The original's header lines, without line endings.

    They end at the first empty line or at the first line that is neither a
    header field nor a continuation, so a message without a separator (or
    without headers) never leaks its body into the DSN.
    """
    lines: list[bytes] = []
    for line in _LINE_BREAK.split(original):
        if _HEADER_FIELD.match(line) or (lines and line[:1] in (b" ", b"\t")):
            lines.append(line)
        else:
            break
    return lines


def _returned_part(original: bytes, unicode: bool, whole: bool) -> bytes:
    """Part 3: the original whole (RET=FULL, in a failure report) when it can
    go as message/rfc822 (7bit, or 8bit for an 8BITMIME body) or, with
    `unicode`, message/global; otherwise its header section."""
    lines = _LINE_BREAK.split(original)
    if whole and b"\x00" not in original and _fits(lines):
        header = ["Content-Description: Undelivered Message"]
        raw = original if original.endswith(b"\r\n") else original + b"\r\n"
        if raw.isascii():
            return _part([*header, "Content-Type: message/rfc822"], raw)
        headers = b"".join(_header_section(original))
        if headers.isascii():
            return _part([*header, "Content-Type: message/rfc822",
                          "Content-Transfer-Encoding: 8bit"], raw)
        if unicode and _is_utf8(headers):
            return _part([*header, "Content-Type: message/global",
                          "Content-Transfer-Encoding: 8bit"], raw)
    if unicode:
        lines = _header_section(original)
        raw = b"".join(line + b"\r\n" for line in lines)
        if not raw.isascii() and _is_utf8(raw) and b"\x00" not in raw and _fits(lines):
            return _part(["Content-Description: Undelivered Message Headers",
                          "Content-Type: message/global-headers",
                          "Content-Transfer-Encoding: 8bit"], raw)
    return _headers_part(original)


def _headers_part(original: bytes) -> bytes:
    """Part 3: the original header section, byte for byte when it can be.

    Unchanged as text/rfc822-headers when it is valid 7-bit content. When
    it holds 8-bit octets, NULs or lines over 998 octets it is sent
    quoted-printable, which RFC 6522 allows for "broken or extended" headers;
    the decoded bytes are exactly the original's, with charset=utf-8 when
    they are UTF-8. message/global-headers (RFC 6533) is used instead only
    about a message that came with SMTPUTF8 (`_returned_part`): in 8bit it
    needs 8BITMIME and SMTPUTF8 at the sender's MX, which a bounce of other
    mail cannot count on, and a quoted-printable message/* part is not
    decoded by common parsers (Python's email among them).
    """
    lines = _header_section(original)
    raw = b"".join(line + b"\r\n" for line in lines)
    headers = ["Content-Description: Undelivered Message Headers"]
    if raw.isascii() and b"\x00" not in raw and _fits(lines):
        return _part([*headers, "Content-Type: text/rfc822-headers"], raw)
    content_type = "Content-Type: text/rfc822-headers"
    if not raw.isascii() and _is_utf8(raw):
        content_type += "; charset=utf-8"
    return _part(
        [*headers, content_type, "Content-Transfer-Encoding: quoted-printable"],
        _quoted_printable(lines),
    )


# -- encoding helpers ---------------------------------------------------------


def _fits(lines: Sequence[str | bytes]) -> bool:
    """True when every line is at most 998 octets."""
    return all(
        len(line.encode("utf-8", errors="replace") if isinstance(line, str) else line)
        <= _HARD_WIDTH
        for line in lines
    )


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _quoted_printable(lines: Sequence[bytes]) -> bytes:
    """Quoted-printable (RFC 2045 6.7) of `lines`, with CRLF hard and soft breaks.

    Each line is encoded as binary, so a stray CR or LF inside it is escaped,
    and the only LFs binascii emits are its soft breaks, made CRLF here.
    """
    encoded = [binascii.b2a_qp(line, quotetabs=False, istext=False) for line in lines]
    return b"".join(chunk.replace(b"\n", b"\r\n") + b"\r\n" for chunk in encoded)


def _boundary(dsn_id: str, parts: Sequence[bytes]) -> str:
    """A boundary that occurs in no part (RFC 2046 5.1.1), at most 70 characters.

    "=_" cannot occur in quoted-printable output, and the loop makes sure it
    is not in the 7-bit parts either, whatever the original headers hold.
    """
    base = f"=_dsn_{dsn_id[:50]}"
    candidate = base
    counter = 0
    while any(candidate.encode("ascii") in part for part in parts):
        counter += 1
        candidate = f"{base}_{counter}"
    return candidate
