"""Outbound SMTP: hand one message to one destination's hops (aiosmtplib underneath).

Owns: the client side of an SMTP dialogue as Postfix smtp(8) holds it: trying
a destination's hops in order, the greeting and EHLO (HELO fallback), the
STARTTLS policy (none / opportunistic / required, never verifying
certificates), MAIL FROM with SMTPUTF8, BODY=8BITMIME and SIZE, RCPT per
recipient, DATA with the stored bytes sent unchanged but for dot-stuffing, and
turning every remote answer or local failure into a `Reply` per recipient.

Refuses: finding hops (MX lookup and loop avoidance belong to routing), deciding
what a reply means for the queue (defer, bounce, backoff: the scheduler's), any
database access, and raising to its caller: `deliver` always returns a
`DeliveryReport`, with synthetic Postfix-like replies (``451 4.4.1 connect to
host[ip]:port: Connection refused``) for failures that have no remote reply.

A hop "fails at session level" when it cannot start a transaction: no
connection, a greeting or EHLO/HELO that is not 2xx, TLS that "required" could
not get, a 4xx (or an unexpected code) to MAIL FROM, or a lost connection
before MAIL FROM was accepted. The next hop is then tried. Once MAIL FROM is
accepted the hop decides: its replies are final for this attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPHeloError,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPStatus,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import SMTPProtocol

from relay.core.model import DeliveryReport, Hop, OutboundMessage, Reply

__all__ = ["SmtpTransport", "TlsPolicy", "Transport"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TlsPolicy = Literal["none", "opportunistic", "required"]

# Dot-stuffing: a "." that starts a line is doubled. Lines are counted after any
# LF, not only after CRLF, so that no lenient server can see "<LF>.<CRLF>" in a
# malformed message as the end of data (stored data is CRLF-only anyway).
_LEADING_DOT = re.compile(rb"(?m)^\.")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")

_QUIT_TIMEOUT = 10.0  # waiting for "221" is a courtesy, not worth longer
_CLOSE_TIMEOUT = 10.0  # waiting for the socket to be gone (a TLS shutdown)

REUSE_LIMIT = 100  # messages per session before a fresh connection
IDLE_TIME = 5.0  # seconds an unused session waits for the next message
MAX_SESSION_AGE = 300.0  # seconds: then a fresh connection (Postfix's reuse time limit)

SOFT_FAILURE = 451  # code of the synthetic replies that defer
HARD_FAILURE = 550  # code of the synthetic replies that bounce


class Transport(Protocol):
    """Delivers one message to one destination, given its hops in order."""

    async def deliver(self, message: OutboundMessage, hops: Sequence[Hop]) -> DeliveryReport: ...


class _SessionFailure(Exception):
    """This hop could not start a transaction: the next hop is tried."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class _TlsHandshakeFailure(_SessionFailure):
    """The TLS handshake itself failed; "opportunistic" retries the hop in plaintext."""


class _Lost(Exception):
    """The connection broke (or timed out, or spoke garbage) while `stage` ran."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class _Client(aiosmtplib.SMTP):
    """aiosmtplib's client, plus a future that resolves once the connection is gone.

    Awaiting it on close means no socket (and no TLS layer mid-shutdown) outlives
    the session, so nothing is left for the garbage collector to warn about.
    """

    def __init__(
        self, *, lost: asyncio.Future[None], hop: Hop, local_hostname: str, timeout: float
    ) -> None:
        super().__init__(
            hostname=hop.address,
            port=hop.port,
            local_hostname=local_hostname,
            timeout=timeout,
            start_tls=False,  # STARTTLS is this module's decision, made after EHLO
        )
        self.lost = lost

    def _on_connection_lost(self, protocol: SMTPProtocol) -> None:
        super()._on_connection_lost(protocol)
        if not self.lost.done():
            self.lost.set_result(None)


def _label(hop: Hop) -> str:
    """ "host[ip]:port", as Postfix names a next hop in its logs and DSNs."""
    return f"{hop.host}[{hop.address}]:{hop.port}"


def _text(response: SMTPResponse) -> str:
    """The reply text on one line (a multi-line reply's lines joined by spaces)."""
    return " ".join(line.strip() for line in response.message.splitlines() if line.strip())


def _remote(response: SMTPResponse) -> Reply:
    """The remote's reply, kept as it said it."""
    return Reply(response.code, _text(response))


def _soft(code: int, message: str, what: str, after: str = "") -> Reply:
    """A 4xx Reply reporting the remote's reply `code message` (any code).

    Reads like Postfix: "4.3.2 host mx[ip]:port refused to talk to me: 421 4.3.2
    Busy". The remote's enhanced status detail is kept but as 4.x.x, the way
    Postfix softens a 5xx greeting so that the next MX is tried.
    """
    text = _text(SMTPResponse(code, message))
    match = _ENHANCED.match(text)
    status = f"4.{match.group(2)}.{match.group(3)}" if match else "4.0.0"
    reply_code = code if 400 <= code < 500 else SOFT_FAILURE
    return Reply(reply_code, f"{status} {what}: {code} {text}".rstrip() + after)


def _os_reason(exc: BaseException | None) -> str:
    """ "Connection refused" rather than asyncio's "Connect call failed (...)"."""
    fallback = str(exc) if exc is not None else "connection failed"
    while exc is not None:
        if isinstance(exc, TimeoutError):
            return "Connection timed out"
        if isinstance(exc, OSError) and exc.errno:
            return os.strerror(exc.errno)
        exc = exc.__cause__ or exc.__context__
    return fallback


def _stuffed(data: bytes) -> bytes:
    """DATA payload: `data` dot-stuffed, then the final <CRLF>.<CRLF>.

    Nothing else changes: line endings are left as stored. A message that does
    not end with CRLF gets one, since the terminator needs it.
    """
    payload = data
    if data.startswith(b".") or b"\n." in data:  # rare: the scan below is the costly part
        payload = _LEADING_DOT.sub(b"..", data)
    if payload and not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return payload + b".\r\n"


def _needs_smtputf8(message: OutboundMessage) -> bool:
    """True when the envelope or the header section is not ASCII (RFC 6531 needed).

    A client may say SMTPUTF8 for a message that turns out to be all ASCII;
    like Postfix (smtputf8_autodetect), such a message can go to a server that
    does not offer SMTPUTF8.
    """
    if not (message.sender.isascii() and all(r.isascii() for r in message.recipients)):
        return True
    headers = message.data.split(b"\r\n\r\n", 1)[0]
    return not headers.isascii()


def _tls_context() -> ssl.SSLContext:
    """A client context that encrypts but verifies nothing, like Postfix "may"/"encrypt"."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _sni(host: str) -> str | None:
    """The name to send as SNI: the MX host name, unless it is an IP literal or odd."""
    name = host.rstrip(".")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name.strip("[]"))
        return None
    if not name or not all(part and len(part) < 64 for part in name.split(".")):
        return None
    return name if name.isascii() else None


class _Session:
    """One SMTP connection to one hop: `open()`, then `send()` messages, then `close()`.

    `send` may be called more than once (connection reuse); each call is one
    mail transaction. Every method reports failures as values or as the
    module's private exceptions, never as aiosmtplib's.
    """

    def __init__(
        self,
        hop: Hop,
        *,
        helo_name: str,
        tls: TlsPolicy,
        tls_context: ssl.SSLContext,
        connect_timeout: float,
        command_timeout: float,
        data_timeout: float,
    ) -> None:
        self.hop = hop
        self.label = _label(hop)
        self.tls_used = False
        self._helo_name = helo_name
        self._tls = tls
        self._tls_context = tls_context
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._data_timeout = data_timeout
        self._smtp: _Client | None = None
        self._raw: asyncio.BaseTransport | None = None  # the TCP transport, under any TLS
        self._connected = False  # a TCP connection was made: close() waits for its end
        self._needs_rset = False

    # ------------------------------------------------------------ opening

    async def open(self) -> None:
        """Connect, read the greeting, EHLO (or HELO), STARTTLS per policy.

        Raises `_SessionFailure` (or `_TlsHandshakeFailure`) with the reply every
        recipient would get if no other hop does better.
        """
        smtp = self._smtp = _Client(
            lost=asyncio.get_running_loop().create_future(),
            hop=self.hop,
            local_hostname=self._helo_name,
            timeout=self._command_timeout,
        )
        try:
            await smtp.connect(timeout=self._connect_timeout)
        except SMTPConnectResponseError as exc:
            self._connected = True
            raise _SessionFailure(
                _soft(exc.code, exc.message, f"host {self.label} refused to talk to me")
            ) from None
        except SMTPConnectTimeoutError as exc:
            if "ready message" in str(exc):  # connected, but no greeting came
                self._connected = True
                raise _SessionFailure(
                    Reply(
                        SOFT_FAILURE,
                        f"4.4.2 conversation with {self.label} timed out"
                        " while receiving the initial server greeting",
                    )
                ) from None
            raise _SessionFailure(
                Reply(SOFT_FAILURE, f"4.4.1 connect to {self.label}: Connection timed out")
            ) from None
        except SMTPConnectError as exc:
            if isinstance(exc.__cause__, SMTPServerDisconnected):
                self._connected = True
                raise _SessionFailure(
                    Reply(
                        SOFT_FAILURE,
                        f"4.4.2 lost connection with {self.label}"
                        " while receiving the initial server greeting",
                    )
                ) from None
            raise _SessionFailure(
                Reply(SOFT_FAILURE, f"4.4.1 connect to {self.label}: {_os_reason(exc)}")
            ) from None
        except (SMTPException, OSError, ValueError) as exc:
            raise _SessionFailure(
                Reply(SOFT_FAILURE, f"4.4.1 connect to {self.label}: {exc}")
            ) from None
        self._raw = smtp.transport
        self._connected = True

        try:
            await self._hello()
            if self._tls != "none":
                await self._starttls()
        except _Lost as lost:
            raise _SessionFailure(lost.reply) from None

    async def _hello(self) -> None:
        """EHLO; HELO after a 5xx to EHLO; anything else not 2xx fails the session."""
        smtp = self._require()
        try:
            await self._guard(smtp.ehlo(), "performing the EHLO handshake")
        except SMTPHeloError as exc:
            if not (500 <= exc.code < 600 and smtp.is_connected):
                raise _SessionFailure(
                    _soft(
                        exc.code,
                        exc.message,
                        f"host {self.label} refused to talk to me",
                        " (in reply to EHLO command)",
                    )
                ) from None
            try:
                await self._guard(smtp.helo(), "performing the HELO handshake")
            except SMTPHeloError as exc2:
                raise _SessionFailure(
                    _soft(
                        exc2.code,
                        exc2.message,
                        f"host {self.label} refused to talk to me",
                        " (in reply to HELO command)",
                    )
                ) from None

    async def _starttls(self) -> None:
        smtp = self._require()
        required = self._tls == "required"
        if not smtp.supports_extension("starttls"):
            if required:
                raise _SessionFailure(
                    Reply(
                        SOFT_FAILURE,
                        f"4.7.4 TLS is required, but was not offered by host {self.label}",
                    )
                )
            return
        try:
            await smtp.starttls(
                tls_context=self._tls_context,
                server_hostname=_sni(self.hop.host),
                timeout=self._command_timeout,
            )
        except SMTPResponseException as exc:
            if exc.code == SMTPStatus.invalid_response:
                smtp.close()
                raise self._handshake_failure(f"protocol error: {exc.message}") from None
            # The server said no to STARTTLS itself (e.g. 454): unless TLS is
            # required the session goes on in plaintext, as Postfix does.
            refusal = f"{exc.code} {_text(SMTPResponse(exc.code, exc.message))}"
            if required:
                smtp.close()
                raise _SessionFailure(
                    Reply(
                        SOFT_FAILURE,
                        f"4.7.4 TLS is required, but host {self.label} refused to start TLS:"
                        f" {refusal}",
                    )
                ) from None
            if not smtp.is_connected:  # 421: it hung up
                raise _SessionFailure(
                    _soft(
                        exc.code, exc.message, f"host {self.label} said", " (in reply to STARTTLS)"
                    )
                ) from None
            return
        except SMTPTimeoutError:
            smtp.close()
            raise self._handshake_failure("timed out") from None
        except (SMTPException, OSError, RuntimeError) as exc:
            smtp.close()
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else str(exc)
            raise self._handshake_failure(reason) from None
        self.tls_used = True
        await self._hello()

    def _handshake_failure(self, reason: str) -> _TlsHandshakeFailure:
        return _TlsHandshakeFailure(
            Reply(SOFT_FAILURE, f"4.7.5 Cannot start TLS with {self.label}: {reason}")
        )

    # ------------------------------------------------------------ sending

    async def send(self, message: OutboundMessage) -> dict[str, Reply]:
        """One mail transaction; returns the deciding reply of every recipient.

        Raises `_SessionFailure` only before MAIL FROM is accepted (a 4xx or an
        odd code to MAIL FROM, a lost connection until then): the hop has then
        decided nothing and the next one may be tried.
        """
        recipients = list(dict.fromkeys(message.recipients))
        smtp = self._require()
        try:
            if self._needs_rset:
                await self._command(b"RSET", stage="sending RSET")
                self._needs_rset = False
        except _Lost as lost:
            raise _SessionFailure(lost.reply) from None

        options: list[bytes] = []
        if message.smtputf8:
            if smtp.supports_extension("smtputf8"):
                options.append(b"SMTPUTF8")
            elif _needs_smtputf8(message):
                return self._all(
                    recipients,
                    Reply(
                        HARD_FAILURE,
                        f"5.6.7 SMTPUTF8 is required, but was not offered by host {self.label}",
                    ),
                )
        if message.eightbit and smtp.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        if smtp.supports_extension("size"):
            options.append(b"SIZE=%d" % len(message.data))
            limit = smtp.esmtp_extensions.get("size", "").strip()
            if limit.isdigit() and 0 < int(limit) < len(message.data):
                return self._all(
                    recipients,
                    Reply(
                        552,
                        f"5.3.4 message size {len(message.data)} exceeds size limit"
                        f" {int(limit)} of server {self.label}",
                    ),
                )

        encoding = "utf-8" if message.smtputf8 else "ascii"
        try:
            sender = f"<{message.sender}>".encode(encoding)
        except UnicodeEncodeError:
            sender = f"<{message.sender}>".encode()
        try:
            response = await self._command(
                b"MAIL", b"FROM:" + sender, *options, stage="sending MAIL FROM"
            )
        except ValueError:
            return self._all(recipients, Reply(HARD_FAILURE, "5.1.7 Bad sender address syntax"))
        except _Lost as lost:
            raise _SessionFailure(lost.reply) from None
        if 500 <= response.code < 600:
            return self._all(recipients, _remote(response))
        if not 200 <= response.code < 300:
            raise _SessionFailure(
                _soft(
                    response.code,
                    response.message,
                    f"host {self.label} said",
                    " (in reply to MAIL FROM command)",
                )
            )

        # MAIL FROM accepted: from here on this hop decides.
        replies: dict[str, Reply] = {}
        accepted: list[str] = []
        for index, rcpt in enumerate(recipients):
            try:
                address = f"<{rcpt}>".encode(encoding)
            except UnicodeEncodeError:
                address = f"<{rcpt}>".encode()
            try:
                response = await self._command(b"RCPT", b"TO:" + address, stage="sending RCPT TO")
            except ValueError:
                replies[rcpt] = Reply(HARD_FAILURE, "5.1.3 Bad recipient address syntax")
                continue
            except _Lost as lost:
                replies.update(self._all([*accepted, *recipients[index:]], lost.reply))
                return replies
            if 200 <= response.code < 300:
                accepted.append(rcpt)
            else:
                replies[rcpt] = _remote(response)
            if response.code == 421:  # the server is closing the channel
                replies.update(self._all([*accepted, *recipients[index + 1 :]], _remote(response)))
                return replies

        self._needs_rset = True  # whatever happens next, the next transaction starts clean
        if not accepted:
            return replies

        try:
            response = await self._command(b"DATA", stage="sending DATA command")
            if response.code == 354:
                response = await self._payload(message.data)
        except _Lost as lost:
            replies.update(self._all(accepted, lost.reply))
            return replies
        if response.code == 354 or not 200 <= response.code < 600:
            reply = Reply(
                SOFT_FAILURE,
                f"4.5.0 host {self.label} gave an unexpected reply to DATA:"
                f" {response.code} {_text(response)}",
            )
        else:
            reply = _remote(response)
        replies.update(self._all(accepted, reply))
        return replies

    async def _payload(self, data: bytes) -> SMTPResponse:
        """Write the message after "354" and read the final reply.

        aiosmtplib's own `data()` rewrites lone CR and LF to CRLF; a relay must
        not, so the bytes go through the protocol directly: written in one go,
        then one reply read, with `data_timeout` for both.
        """
        smtp = self._require()
        protocol = smtp.protocol
        stage = "sending end of data -- message may be sent more than once"
        if protocol is None:
            raise _Lost(
                Reply(
                    SOFT_FAILURE,
                    f"4.4.2 lost connection with {self.label} while sending message body",
                )
            )
        try:
            protocol.write(_stuffed(data))
        except SMTPServerDisconnected:
            smtp.close()
            raise _Lost(
                Reply(
                    SOFT_FAILURE,
                    f"4.4.2 lost connection with {self.label} while sending message body",
                )
            ) from None
        return await self._guard(protocol.read_response(timeout=self._data_timeout), stage)

    # ------------------------------------------------------------ closing

    async def close(self) -> None:
        """QUIT if still connected, then wait until the socket is really closed."""
        smtp = self._smtp
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                with contextlib.suppress(SMTPException, OSError, ValueError, _Lost):
                    await self._command(
                        b"QUIT",
                        stage="sending QUIT",
                        timeout=min(_QUIT_TIMEOUT, self._command_timeout),
                    )
            smtp.close()
            if self._connected and not smtp.lost.done():
                try:
                    await asyncio.wait_for(asyncio.shield(smtp.lost), _CLOSE_TIMEOUT)
                except TimeoutError:
                    self.abort()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the connection now, without QUIT (used when cancelled)."""
        if self._smtp is not None:
            self._smtp.close()
        if self._raw is not None and not self._raw.is_closing():
            self._raw.abort()

    @property
    def connected(self) -> bool:
        """Still usable for another transaction."""
        return self._smtp is not None and self._smtp.is_connected

    # ------------------------------------------------------------ helpers

    def _require(self) -> _Client:
        if self._smtp is None:
            raise _Lost(Reply(SOFT_FAILURE, f"4.4.2 not connected to {self.label}"))
        return self._smtp

    async def _command(
        self, *args: bytes, stage: str, timeout: float | None = None
    ) -> SMTPResponse:
        smtp = self._require()
        return await self._guard(
            smtp.execute_command(*args, timeout=timeout or self._command_timeout), stage
        )

    async def _guard(self, awaitable: Awaitable[_T], stage: str) -> _T:
        """Await `awaitable`; a broken, silent or garbled connection becomes `_Lost`.

        Other aiosmtplib errors (a refused EHLO or STARTTLS) pass through.
        """
        try:
            return await awaitable
        except SMTPTimeoutError:
            self._drop()
            raise _Lost(
                Reply(SOFT_FAILURE, f"4.4.2 conversation with {self.label} timed out while {stage}")
            ) from None
        except (SMTPServerDisconnected, OSError):
            self._drop()
            raise _Lost(
                Reply(SOFT_FAILURE, f"4.4.2 lost connection with {self.label} while {stage}")
            ) from None
        except SMTPResponseException as exc:
            if exc.code != SMTPStatus.invalid_response:
                raise
            self._drop()
            raise _Lost(
                Reply(
                    SOFT_FAILURE,
                    f"4.5.0 protocol error with {self.label} while {stage}: {exc.message}",
                )
            ) from None

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()

    @staticmethod
    def _all(recipients: Sequence[str], reply: Reply) -> dict[str, Reply]:
        return dict.fromkeys(recipients, reply)


class SmtpTransport:
    """`Transport` over SMTP with aiosmtplib, reusing sessions per remote address.

    A session that delivered a message waits up to IDLE_TIME for the next
    message to the same address (RSET between transactions), for at most
    REUSE_LIMIT messages and MAX_SESSION_AGE seconds; a cached session that
    went stale is closed and replaced by a fresh one without counting against
    the hop.

    `tls`: "none" never sends STARTTLS; "opportunistic" uses it when offered and
    retries the same hop once in plaintext if the handshake fails; "required"
    treats a hop without working STARTTLS as down (deferred, 4.7.x). No mode
    verifies certificates (Postfix "may" / "encrypt").
    """

    def __init__(
        self,
        *,
        helo_name: str,
        tls: TlsPolicy,
        connect_timeout: float,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
        reuse_limit: int = REUSE_LIMIT,
        idle_time: float = IDLE_TIME,
        max_age: float = MAX_SESSION_AGE,
    ) -> None:
        if tls not in ("none", "opportunistic", "required"):
            raise ValueError(f"tls must be none, opportunistic or required, not {tls!r}")
        self.helo_name = helo_name
        self.tls: TlsPolicy = tls
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self._tls_context = _tls_context()
        self.reuse_limit = reuse_limit
        self.idle_time = idle_time
        self.max_age = max_age
        self._idle: dict[tuple[str, int], list[_Cached]] = {}
        self.sessions_opened = 0  # for tests and benchmarks: sessions vs. messages
        self._closing: set[asyncio.Future[None]] = set()

    async def deliver(self, message: OutboundMessage, hops: Sequence[Hop]) -> DeliveryReport:
        """Try `hops` in order until one decides; never raises (but for cancellation)."""
        errors: list[str] = []
        last = Reply(SOFT_FAILURE, "4.4.3 no next hop to try")
        try:
            for hop in hops:
                tls = self.tls
                while True:
                    try:
                        replies = await self._attempt(message, hop, tls)
                    except _TlsHandshakeFailure as failure:
                        errors.append(str(failure.reply))
                        log.info("%s: %s", message.queue_id, failure.reply)
                        if tls == "opportunistic":
                            tls = "none"  # Postfix "may": the same hop once more, in plaintext
                            continue
                        last = failure.reply
                        break
                    except _SessionFailure as failure:
                        errors.append(str(failure.reply))
                        log.info("%s: %s", message.queue_id, failure.reply)
                        last = failure.reply
                        break
                    return DeliveryReport(
                        replies=replies, remote_host=_label(hop), errors=tuple(errors)
                    )
        except Exception as exc:  # a bug here must not lose the message: defer it
            log.exception("%s: unexpected error in the SMTP client", message.queue_id)
            reply = Reply(SOFT_FAILURE, f"4.3.0 local error in the SMTP client: {exc!r}")
            return DeliveryReport(
                replies=dict.fromkeys(message.recipients, reply),
                errors=(*errors, str(reply)),
            )
        if not hops:
            errors.append(str(last))
        return DeliveryReport(
            replies=dict.fromkeys(message.recipients, last),
            site_failure=True,
            errors=tuple(errors),
        )

    async def _attempt(
        self, message: OutboundMessage, hop: Hop, tls: TlsPolicy
    ) -> dict[str, Reply]:
        key = (hop.address, hop.port)
        while (cached := self._take_idle(key)) is not None:
            try:
                replies = await cached.session.send(message)
            except _SessionFailure:
                await cached.session.close()  # went stale while idle: not the hop's fault
                continue
            except BaseException:
                cached.session.abort()
                raise
            cached.sent += 1
            await self._keep_or_close(key, cached)
            return replies
        session = _Session(
            hop,
            helo_name=self.helo_name,
            tls=tls,
            tls_context=self._tls_context,
            connect_timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            data_timeout=self.data_timeout,
        )
        self.sessions_opened += 1
        try:
            await session.open()
            replies = await session.send(message)
        except BaseException:
            await session.close()
            raise
        await self._keep_or_close(key, _Cached(session, time.monotonic(), sent=1))
        return replies

    # ------------------------------------------------------------ connection cache

    def _take_idle(self, key: tuple[str, int]) -> _Cached | None:
        pool = self._idle.get(key)
        while pool:
            cached = pool.pop()
            if cached.timer is not None:
                cached.timer.cancel()
            if cached.session.connected:
                return cached
            cached.session.abort()
        return None

    async def _keep_or_close(self, key: tuple[str, int], cached: _Cached) -> None:
        """Keep a healthy session for the next message to the same address, for a while."""
        fresh = time.monotonic() - cached.opened < self.max_age
        if cached.session.connected and cached.sent < self.reuse_limit and fresh:
            loop = asyncio.get_running_loop()
            cached.timer = loop.call_later(self.idle_time, self._expire, key, cached)
            self._idle.setdefault(key, []).append(cached)
        else:
            await cached.session.close()

    def _expire(self, key: tuple[str, int], cached: _Cached) -> None:
        pool = self._idle.get(key, [])
        if cached in pool:
            pool.remove(cached)
            task = asyncio.ensure_future(cached.session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle session (on shutdown)."""
        sessions = [c for pool in self._idle.values() for c in pool]
        self._idle.clear()
        for cached in sessions:
            if cached.timer is not None:
                cached.timer.cancel()
        await asyncio.gather(*(c.session.close() for c in sessions), *self._closing,
                             return_exceptions=True)


@dataclass(eq=False)
class _Cached:
    session: _Session
    opened: float
    sent: int = 0
    timer: asyncio.TimerHandle | None = None
