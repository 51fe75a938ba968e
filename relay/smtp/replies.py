"""What the accept side says: reply texts, enhanced status codes, the Received header.

Owns the fixed wording of our replies and the pure checks that choose one
(hop counting, UTF-8 validity), the RFC 2034 enhanced codes given to stock
aiosmtpd replies, and the `Received:` header we prepend. Refuses sessions,
sockets and storage (`server.py`, `listeners.py`): everything here is a
function of its arguments.

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
* out of room (SPEC "Running out of room"): `452 4.3.1 Insufficient system
  storage` to MAIL while the queue's file system is short of space; `451
  4.3.1 Insufficient system resources` at the end of a message that did not
  fit `smtp.max_inflight_data`
* ETRN: `250 2.0.0 Queuing for node D started`; `459 4.7.1 Node D not
  allowed: access denied` for clients outside `smtp.etrn_clients`; `458 4.1.0
  Unable to queue messages for node D: not a hosted domain`; `501 5.5.4
  Syntax: ETRN <domain>`; a repeat within `smtp.etrn_interval`: `458 4.7.1
  Unable to queue messages for node D: too many ETRN requests, try again
  later` (RFC 1985 has no code of its own for a rate limit). `@domain` is
  taken as `domain`; `#queue` gets the 458.
* MAIL in plaintext from `smtp.require_tls_from`: `530 5.7.0 Must issue a
  STARTTLS command first` (RFC 3207's wording)
* early talker (data within `smtp.greet_pause`, before our greeting):
  `554 5.5.0 <hostname> Error: protocol violation (data sent before the
  greeting)` instead of the 220, then close
* timeouts: `421 4.4.2 <hostname> Error: timeout exceeded`, then close;
  `command_timeout`/`data_timeout` of 0 mean "no timeout". A command line
  must be complete within `command_timeout` of our previous reply, however it
  trickles in; inside DATA a client earns 1 s per `min_data_rate` bytes and
  never holds more than `data_timeout` (a slow but steady client is not
  dropped, one dripping a byte every few seconds is); a session older than
  `max_session_time` hears it after the reply to the message in hand
  (`deadline.py`).
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
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from datetime import datetime

from relay.core.room import SHORT_OF_MEMORY
from relay.smtp.data import LINE_TOO_LONG, TOO_BIG

MAX_HOPS = 50

BARE_CR_LF = "550 5.5.2 Error: bare <CR> or <LF> in message data"
NUL_BYTE = "554 5.6.0 Error: NUL byte in message data"
TOO_MANY_HOPS = "554 5.4.6 Too many hops"
STORAGE_FAILED = "451 4.3.0 Error: queue file write error"
INTERNAL_ERROR = "451 4.3.0 Error: internal error"

DATA_PROBLEMS = {
    TOO_BIG: "message_size",
    LINE_TOO_LONG: "line_too_long",
    BARE_CR_LF: "bare_cr_lf",
    NUL_BYTE: "nul_byte",
    TOO_MANY_HOPS: "hops",
    SHORT_OF_MEMORY: "inflight_data",
}
POLICY_REASONS = {554: "relay_denied", 550: "unknown_recipient", 451: "lookup_failure",
                  501: "recipient_syntax", 450: "unverified_recipient"}

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
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

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



def one_reply_line(status: str) -> str:
    """A reply echoing client text, with its control characters (CR and LF
    would split the reply, a NUL would end it for some clients) as `?`."""
    return _CONTROL.sub("?", status)


def printable(text: str, limit: int = 255) -> str:
    """Client-supplied text made safe for a header: printable ASCII, bounded."""
    return _NOT_PRINTABLE.sub("?", text[:limit]) or "unknown"


def valid_utf8(text: str) -> bool:
    """False when the client sent bytes that are not UTF-8 (decoded as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def received_header(helo: str, ip: str, hostname: str, protocol: str, queue_id: str,
                    recipients: Sequence[str], now: datetime) -> bytes:
    """Our `Received:` header (RFC 5321 4.4), CRLF-terminated; `for <rcpt>` only
    when there is exactly one recipient, so a Bcc list is never disclosed."""
    literal = f"IPv6:{ip}" if ":" in ip else ip
    date = email.utils.format_datetime(now)
    head = (f"Received: from {printable(helo)} (unknown [{literal}])\r\n"
            f"\tby {hostname} (mx-relay) with {protocol} id {queue_id}")
    if len(recipients) == 1:
        tail = f"\r\n\tfor <{recipients[0]}>; {date}\r\n"
    else:
        tail = f";\r\n\t{date}\r\n"
    return (head + tail).encode("utf-8")


def count_received(data: bytes, start: int) -> int:
    """Received: headers in the header section (stops counting past the limit)."""
    end = data.find(b"\r\n\r\n", start - 2)
    end = len(data) if end < 0 else end + 2
    count = 0
    for _ in _RECEIVED_RE.finditer(data, start - 1, end):
        count += 1
        if count > MAX_HOPS:
            break
    return count
