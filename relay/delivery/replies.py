"""Outbound SMTP replies: the remote's answers as `Reply` values, and the
synthetic Postfix-like ones for failures that have no remote reply.

Owns how a hop is named (``host[ip]:port``), how a remote reply is kept
(one line), how a refusal or a lost connection becomes a 4xx `Reply`
(``451 4.4.1 connect to host[ip]:port: Connection refused``) and the two
exceptions a session raises to its transport. Refuses sockets and deciding
what a reply means for the queue (the scheduler's).
"""

from __future__ import annotations

import os
import re

from aiosmtplib import SMTPResponse

from relay.core.model import Hop, Reply

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")

SOFT_FAILURE = 451  # code of the synthetic replies that defer
HARD_FAILURE = 550  # code of the synthetic replies that bounce


class SessionFailure(Exception):
    """This hop could not start a transaction: the next hop is tried."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class TlsHandshakeFailure(SessionFailure):
    """The TLS handshake itself failed; "opportunistic" retries the hop in plaintext."""


class Lost(Exception):
    """The connection broke (or timed out, or spoke garbage) while `stage` ran."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def hop_label(hop: Hop) -> str:
    """ "host[ip]:port", as Postfix names a next hop in its logs and DSNs."""
    return f"{hop.host}[{hop.address}]:{hop.port}"


def reply_text(response: SMTPResponse) -> str:
    """The reply text on one line (a multi-line reply's lines joined by spaces)."""
    return " ".join(line.strip() for line in response.message.splitlines() if line.strip())


def remote_reply(response: SMTPResponse) -> Reply:
    """The remote's reply, kept as it said it."""
    return Reply(response.code, reply_text(response))


def soft_reply(code: int, message: str, what: str, after: str = "") -> Reply:
    """A 4xx Reply reporting the remote's reply `code message` (any code).

    Reads like Postfix: "4.3.2 host mx[ip]:port refused to talk to me: 421 4.3.2
    Busy". The remote's enhanced status detail is kept but as 4.x.x, the way
    Postfix softens a 5xx greeting so that the next MX is tried.
    """
    text = reply_text(SMTPResponse(code, message))
    match = _ENHANCED.match(text)
    status = f"4.{match.group(2)}.{match.group(3)}" if match else "4.0.0"
    reply_code = code if 400 <= code < 500 else SOFT_FAILURE
    return Reply(reply_code, f"{status} {what}: {code} {text}".rstrip() + after)


def os_reason(exc: BaseException | None) -> str:
    """ "Connection refused" rather than asyncio's "Connect call failed (...)"."""
    fallback = str(exc) if exc is not None else "connection failed"
    while exc is not None:
        if isinstance(exc, TimeoutError):
            return "Connection timed out"
        if isinstance(exc, OSError) and exc.errno:
            return os.strerror(exc.errno)
        exc = exc.__cause__ or exc.__context__
    return fallback
