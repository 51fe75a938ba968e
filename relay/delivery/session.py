"""One outbound SMTP connection to one hop (aiosmtplib underneath).

Owns the client side of one SMTP dialogue as Postfix smtp(8) holds it: the
greeting and EHLO (HELO fallback), the STARTTLS policy (none / opportunistic /
required without checking certificates; verify: the certificate must be valid
for the hop's name), MAIL FROM with SMTPUTF8, BODY=8BITMIME and SIZE, RCPT
per recipient, DATA with the stored bytes sent unchanged but for
dot-stuffing, RSET between transactions on a reused connection, and QUIT.
Every remote answer or local failure comes back as a `Reply` per recipient,
or as `SessionFailure` when no transaction could start. A connection lost or
silent after the final "." gives replies flagged `uncertain` (RFC 1047): the
hop may have the message.

Refuses choosing hops, keeping connections for reuse (`transport.py`) and
wording synthetic replies (`replies.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import ssl
from collections.abc import Awaitable, Sequence
from typing import Literal, TypeVar, cast

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

from relay.core.dsnparams import NO_RCPT_PARAMS
from relay.core.model import Hop, OutboundMessage, Reply
from relay.delivery.replies import (
    HARD_FAILURE,
    SOFT_FAILURE,
    Lost,
    SessionFailure,
    TlsHandshakeFailure,
    hop_label,
    os_reason,
    remote_reply,
    reply_text,
    soft_reply,
)

_T = TypeVar("_T")

TlsPolicy = Literal["none", "opportunistic", "required", "verify"]

# Dot-stuffing: a "." that starts a line is doubled. Lines are counted after any
# LF, not only after CRLF, so that no lenient server can see "<LF>.<CRLF>" in a
# malformed message as the end of data (stored data is CRLF-only anyway).
_LEADING_DOT = re.compile(rb"(?m)^\.")

_QUIT_TIMEOUT = 10.0  # waiting for "221" is a courtesy, not worth longer
_CLOSE_TIMEOUT = 10.0  # waiting for the socket to be gone (a TLS shutdown)


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


def dot_stuffed(data: bytes) -> bytes:
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


def needs_smtputf8(message: OutboundMessage) -> bool:
    """True when the envelope or the header section is not ASCII (RFC 6531 needed).

    A client may say SMTPUTF8 for a message that turns out to be all ASCII;
    like Postfix (smtputf8_autodetect), such a message can go to a server that
    does not offer SMTPUTF8.
    """
    if not (message.sender.isascii() and all(r.isascii() for r in message.recipients)):
        return True
    headers = message.data.split(b"\r\n\r\n", 1)[0]
    return not headers.isascii()


def client_tls_context() -> ssl.SSLContext:
    """A client context that encrypts but verifies nothing, like Postfix "may"/"encrypt"."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verifying_tls_context(ca_file: str = "") -> ssl.SSLContext:
    """A client context that checks the certificate chain (against `ca_file`
    when given, else the system CAs) and the host name, for `tls = "verify"`."""
    return ssl.create_default_context(cafile=ca_file or None)


def verified_name(host: str) -> str:
    """The name a certificate must carry: the MX (or next_hop) host, or its IP literal."""
    return host.rstrip(".").strip("[]")


def sni_name(host: str) -> str | None:
    """The name to send as SNI: the MX host name, unless it is an IP literal or odd."""
    name = host.rstrip(".")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name.strip("[]"))
        return None
    if not name or not all(part and len(part) < 64 for part in name.split(".")):
        return None
    return name if name.isascii() else None


class Session:
    """One SMTP connection to one hop: `open()`, then `send()` messages, then `close()`.

    `send` may be called more than once (connection reuse); each call is one
    mail transaction. Every method reports failures as values or as the
    exceptions of `replies.py`, never as aiosmtplib's.
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
        self.label = hop_label(hop)
        self.tls_used = False
        self._helo_name = helo_name
        self._tls = tls
        self._tls_context = tls_context
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._data_timeout = data_timeout
        self._smtp: _Client | None = None
        self._raw: asyncio.Transport | None = None  # the TCP transport, under any TLS
        self._connected = False  # a TCP connection was made: close() waits for its end
        self._needs_rset = False
        self.offers_dsn = False  # its EHLO listed DSN (RFC 3461): known after send()

    # ------------------------------------------------------------ opening

    async def open(self) -> None:
        """Connect, read the greeting, EHLO (or HELO), STARTTLS per policy.

        Raises `SessionFailure` (or `TlsHandshakeFailure`) with the reply every
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
            raise SessionFailure(
                soft_reply(exc.code, exc.message, f"host {self.label} refused to talk to me")
            ) from None
        except SMTPConnectTimeoutError as exc:
            if "ready message" in str(exc):  # connected, but no greeting came
                self._connected = True
                raise SessionFailure(
                    Reply(
                        SOFT_FAILURE,
                        f"4.4.2 conversation with {self.label} timed out"
                        " while receiving the initial server greeting",
                    )
                ) from None
            raise SessionFailure(
                Reply(SOFT_FAILURE, f"4.4.1 connect to {self.label}: Connection timed out")
            ) from None
        except SMTPConnectError as exc:
            if isinstance(exc.__cause__, SMTPServerDisconnected):
                self._connected = True
                raise SessionFailure(
                    Reply(
                        SOFT_FAILURE,
                        f"4.4.2 lost connection with {self.label}"
                        " while receiving the initial server greeting",
                    )
                ) from None
            raise SessionFailure(
                Reply(SOFT_FAILURE, f"4.4.1 connect to {self.label}: {os_reason(exc)}")
            ) from None
        except (SMTPException, OSError, ValueError) as exc:
            raise SessionFailure(
                Reply(SOFT_FAILURE, f"4.4.1 connect to {self.label}: {exc}")
            ) from None
        self._raw = cast("asyncio.Transport | None", smtp.transport)  # a stream transport
        self._connected = True

        try:
            await self._hello()
            if self._tls != "none":
                await self._starttls()
        except Lost as lost:
            raise SessionFailure(lost.reply) from None

    async def _hello(self) -> None:
        """EHLO; HELO after a 5xx to EHLO; anything else not 2xx fails the session."""
        smtp = self._require()
        try:
            await self._guard(smtp.ehlo(), "performing the EHLO handshake")
        except SMTPHeloError as exc:
            if not (500 <= exc.code < 600 and smtp.is_connected):
                raise SessionFailure(
                    soft_reply(
                        exc.code,
                        exc.message,
                        f"host {self.label} refused to talk to me",
                        " (in reply to EHLO command)",
                    )
                ) from None
            try:
                await self._guard(smtp.helo(), "performing the HELO handshake")
            except SMTPHeloError as exc2:
                raise SessionFailure(
                    soft_reply(
                        exc2.code,
                        exc2.message,
                        f"host {self.label} refused to talk to me",
                        " (in reply to HELO command)",
                    )
                ) from None

    async def _starttls(self) -> None:
        smtp = self._require()
        verify = self._tls == "verify"
        required = verify or self._tls == "required"
        if not smtp.supports_extension("starttls"):
            if required:
                raise SessionFailure(
                    Reply(
                        SOFT_FAILURE,
                        f"4.7.4 TLS is required, but was not offered by host {self.label}",
                    )
                )
            return
        try:
            await smtp.starttls(
                tls_context=self._tls_context,
                server_hostname=verified_name(self.hop.host) if verify else sni_name(self.hop.host),
                timeout=self._command_timeout,
            )
        except SMTPResponseException as exc:
            if exc.code == SMTPStatus.invalid_response:
                smtp.close()
                raise self._handshake_failure(f"protocol error: {exc.message}") from None
            # The server said no to STARTTLS itself (e.g. 454): unless TLS is
            # required the session goes on in plaintext, as Postfix does.
            refusal = f"{exc.code} {reply_text(SMTPResponse(exc.code, exc.message))}"
            if required:
                smtp.close()
                raise SessionFailure(
                    Reply(
                        SOFT_FAILURE,
                        f"4.7.4 TLS is required, but host {self.label} refused to start TLS:"
                        f" {refusal}",
                    )
                ) from None
            if not smtp.is_connected:  # 421: it hung up
                raise SessionFailure(
                    soft_reply(
                        exc.code, exc.message, f"host {self.label} said", " (in reply to STARTTLS)"
                    )
                ) from None
            return
        except SMTPTimeoutError:
            smtp.close()
            raise self._handshake_failure("timed out") from None
        except (SMTPException, OSError, RuntimeError) as exc:
            smtp.close()
            raise self._handshake_failure(_tls_reason(exc)) from None
        self.tls_used = True
        await self._hello()

    def _handshake_failure(self, reason: str) -> TlsHandshakeFailure:
        return TlsHandshakeFailure(
            Reply(SOFT_FAILURE, f"4.7.5 Cannot start TLS with {self.label}: {reason}")
        )

    # ------------------------------------------------------------ sending

    async def send(self, message: OutboundMessage) -> dict[str, Reply]:
        """One mail transaction; returns the deciding reply of every recipient.

        Raises `SessionFailure` only before MAIL FROM is accepted (a 4xx or an
        odd code to MAIL FROM, a lost connection until then): the hop has then
        decided nothing and the next one may be tried.
        """
        recipients = list(dict.fromkeys(message.recipients))
        smtp = self._require()
        try:
            if self._needs_rset:
                await self._command(b"RSET", stage="sending RSET")
                self._needs_rset = False
        except Lost as lost:
            raise SessionFailure(lost.reply) from None

        options: list[bytes] = []
        if message.smtputf8:
            if smtp.supports_extension("smtputf8"):
                options.append(b"SMTPUTF8")
            elif needs_smtputf8(message):
                return self._all(
                    recipients,
                    Reply(
                        HARD_FAILURE,
                        f"5.6.7 SMTPUTF8 is required, but was not offered by host {self.label}",
                    ),
                )
        if message.eightbit and smtp.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        dsn = self.offers_dsn = smtp.supports_extension("dsn")  # else none go on (RFC 3461 4)
        rcpt_dsn = dict(message.rcpt_dsn) if dsn else {}
        if dsn:
            options += [option.encode("ascii") for option in message.dsn.options()]
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

        utf8 = message.smtputf8 and smtp.supports_extension("smtputf8")
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
        except Lost as lost:
            raise SessionFailure(lost.reply) from None
        if 500 <= response.code < 600:
            return self._all(recipients, remote_reply(response))
        if not 200 <= response.code < 300:
            raise SessionFailure(
                soft_reply(
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
                params = rcpt_dsn.get(rcpt, NO_RCPT_PARAMS).options(utf8)
                response = await self._command(b"RCPT", b"TO:" + address,
                                               *(p.encode() for p in params),
                                               stage="sending RCPT TO")
            except ValueError:
                replies[rcpt] = Reply(HARD_FAILURE, "5.1.3 Bad recipient address syntax")
                continue
            except Lost as lost:
                replies.update(self._all([*accepted, *recipients[index:]], lost.reply))
                return replies
            if 200 <= response.code < 300:
                accepted.append(rcpt)
            else:
                replies[rcpt] = remote_reply(response)
            if response.code == 421:  # the server is closing the channel
                rest = [*accepted, *recipients[index + 1 :]]
                replies.update(self._all(rest, remote_reply(response)))
                return replies

        self._needs_rset = True  # whatever happens next, the next transaction starts clean
        if not accepted:
            return replies

        try:
            response = await self._command(b"DATA", stage="sending DATA command")
            if response.code == 354:
                response = await self._payload(message.data)
        except Lost as lost:
            replies.update(self._all(accepted, lost.reply))
            return replies
        if response.code == 354 or not 200 <= response.code < 600:
            reply = Reply(
                SOFT_FAILURE,
                f"4.5.0 host {self.label} gave an unexpected reply to DATA:"
                f" {response.code} {reply_text(response)}",
            )
        else:
            reply = remote_reply(response)
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
            raise Lost(
                Reply(
                    SOFT_FAILURE,
                    f"4.4.2 lost connection with {self.label} while sending message body",
                )
            )
        try:
            protocol.write(dot_stuffed(data))
        except SMTPServerDisconnected:
            smtp.close()
            raise Lost(
                Reply(
                    SOFT_FAILURE,
                    f"4.4.2 lost connection with {self.label} while sending message body",
                )
            ) from None
        # The final "." is out: from here a lost or silent connection leaves the
        # outcome unknown, and the reply says so.
        return await self._guard(
            protocol.read_response(timeout=self._data_timeout), stage, uncertain=True
        )

    # ------------------------------------------------------------ closing

    async def close(self) -> None:
        """QUIT if still connected, then wait until the socket is really closed."""
        smtp = self._smtp
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                with contextlib.suppress(SMTPException, OSError, ValueError, Lost):
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
            raise Lost(Reply(SOFT_FAILURE, f"4.4.2 not connected to {self.label}"))
        return self._smtp

    async def _command(
        self, *args: bytes, stage: str, timeout: float | None = None
    ) -> SMTPResponse:
        smtp = self._require()
        return await self._guard(
            smtp.execute_command(*args, timeout=timeout or self._command_timeout), stage
        )

    async def _guard(self, awaitable: Awaitable[_T], stage: str, *, uncertain: bool = False) -> _T:
        """Await `awaitable`; a broken, silent or garbled connection becomes `Lost`.

        `uncertain`: the message may have been taken already (after the final
        "."), so a lost or timed-out connection gives an uncertain reply.
        Other aiosmtplib errors (a refused EHLO or STARTTLS) pass through.
        """
        try:
            return await awaitable
        except SMTPTimeoutError:
            self._drop()
            raise Lost(
                Reply(
                    SOFT_FAILURE,
                    f"4.4.2 conversation with {self.label} timed out while {stage}",
                    uncertain=uncertain,
                )
            ) from None
        except (SMTPServerDisconnected, OSError):
            self._drop()
            raise Lost(
                Reply(
                    SOFT_FAILURE,
                    f"4.4.2 lost connection with {self.label} while {stage}",
                    uncertain=uncertain,
                )
            ) from None
        except SMTPResponseException as exc:
            if exc.code != SMTPStatus.invalid_response:
                raise
            self._drop()
            raise Lost(
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


def _tls_reason(exc: BaseException) -> str:
    """Why a handshake failed, naming the certificate problem when there is one
    ("certificate verify failed: Hostname mismatch, ...")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {seen.verify_message}"
        seen = seen.__cause__ or seen.__context__
    return exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else str(exc)
