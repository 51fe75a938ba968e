"""The SMTP accept side: aiosmtpd sessions that turn client mail into queue entries.

Owns everything a sending MTA sees from us (SPEC "SMTP accept side"): the
banner and EHLO keywords, MAIL/RCPT/DATA checks and their replies (all with
RFC 3463 enhanced status codes), the prepended `Received:` header, the
replies of the connection and message-rate limits, command and DATA
timeouts, STARTTLS, ETRN, and the rule that `250 ... queued as ID` is said
only after `submit` has returned, i.e. after the message is durably committed.

Refuses: deciding which addresses are valid (`policy.py`), the wording of
replies and the Received header (`replies.py`), what sessions share
(`shared.py`), counting clients against the limits (`limits.py`), binding
sockets and the order of a shutdown (`listeners.py`), storing anything
itself (the `submit` callable does), AUTH (we never authenticate anyone), VRFY/EXPN (no address
harvesting), and reverse DNS (the Received header says `unknown`).

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
import functools
import logging
import sys
from datetime import datetime
from typing import cast

from aiosmtpd.smtp import SMTP, TLSSetupException, login_always_fail

from relay.core import maillog
from relay.core.address import host_key
from relay.core.room import SHORT_OF_SPACE
from relay.queue.gather import NO_ARRIVAL, Arrival
from relay.queue.rows import NewMessage, QueueError
from relay.smtp.data import TOO_BIG, DataReceiver, give_back
from relay.smtp.deadline import DataDeadline, SessionCap
from relay.smtp.envelope import RelayEnvelope, mail_params, rcpt_params
from relay.smtp.etrn import answer_etrn
from relay.smtp.policy import PathSyntaxError, sender_address, split_path
from relay.smtp.replies import (
    BARE_CR_LF,
    DATA_PROBLEMS,
    INTERNAL_ERROR,
    MAX_HOPS,
    NUL_BYTE,
    POLICY_REASONS,
    STORAGE_FAILED,
    TOO_MANY_HOPS,
    count_received,
    enhance,
    one_reply_line,
    printable,
    received_header,
    valid_utf8,
)
from relay.smtp.shared import Shared, client_ip
from relay.smtp.spf import checked, prepended

log = logging.getLogger("relay.smtp.server")

IDENT = "ESMTP mx-relay"
_WHOLE_BUFFER = sys.maxsize  # a read() this large empties the StreamReader's buffer


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
        self._settings = shared.settings  # this session's config, whatever a reload does
        self.client_ip = "unknown"
        self.admitted = False
        self.handler_task: asyncio.Task[None] | None = None
        self._refusal: str | None = None
        self._in_data = False
        self._busy = False  # receiving or storing a message: close() lets it finish
        self._arrival = NO_ARRIVAL  # this transaction's message, on its way to the writer
        self._deadline = DataDeadline(0.0, 0.0, 0)  # replaced at every DATA
        self._cap = SessionCap(shared.loop, self._settings.max_session_time, self._timeout_cb,
                               lambda: self._busy)  # the protocol is made as the client connects
        self._continued: list[bytes] = []  # lines of a multi-line reply not sent yet
        self._talked = False  # the client sent something (watched before the greeting)
        self._talk_waiter: asyncio.Future[None] | None = None  # only while greet_pause runs
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
        settings = self._settings
        self.data_size_limit = settings.max_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        # aiosmtpd keeps this dict on the class, shared by every session; EHLO
        # grows it. A per-session copy keeps sessions independent.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.hostname = shared.hostname
        self.tls_context = settings.tls_context
        self.require_starttls = False
        self._timeout_duration = settings.command_timeout
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
        verbs = _smtp_verbs(type(self))  # type: ignore[arg-type]  # classes hash by identity
        self._smtp_methods = {verb: getattr(self, name) for verb, name in verbs}
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
            self._cap.cancel()
            self._arrival.end()

    def _set_post_data_state(self) -> None:
        self._arrival.end()  # the transaction is over: nothing more will come of it
        super()._set_post_data_state()

    def data_received(self, data: bytes) -> None:
        self._talked = True
        if self._talk_waiter is not None and not self._talk_waiter.done():
            self._talk_waiter.set_result(None)
        super().data_received(data)

    async def _handle_client(self) -> None:
        if self._refusal is None and await self._talks_early():
            self._refusal = (f"554 5.5.0 {self.hostname} Error: protocol violation"
                             " (data sent before the greeting)")
            self._shared.reject("early_talker")
        if self._refusal is None:
            await super()._handle_client()
            return
        maillog.rejected(self.client_ip, "CONNECT", self._refusal)
        with contextlib.suppress(ConnectionError):
            await self.push(self._refusal)
        if self.transport is not None:
            self.transport.close()

    async def _talks_early(self) -> bool:
        """True if the client sent anything within `smtp.greet_pause`: a real
        MTA waits for our 220, bulk-mail software often does not (postscreen)."""
        pause = self._settings.greet_pause
        if pause <= 0:
            return False
        if not self._talked:
            self._talk_waiter = self.loop.create_future()
            try:
                await asyncio.wait_for(self._talk_waiter, pause)
            except TimeoutError:
                return False
            finally:
                self._talk_waiter = None
        return True

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        left = self._deadline.left(self.loop.time())
        if self._in_data and left > 0:
            self._timeout_handle = self.loop.call_later(left, self._timeout_cb)
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
            if not status.isprintable():  # echoed client text: no CR, LF or NUL in a reply
                status = one_reply_line(status)
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
        keywords = [f"SIZE {self._settings.max_size}", "8BITMIME", "PIPELINING",
                    "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"]
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
        if self._tls_protocol is None and self._settings.tls_required(self.client_ip):
            self._shared.reject("tls_required")
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
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
        taken = mail_params(params)  # RFC 3461 RET, ENVID
        if isinstance(taken, str):
            await self.push(taken)
            return
        dsn, params = taken
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
        if size > self._settings.max_size:
            await self._refuse("message_size", "MAIL", TOO_BIG, sender)
            return
        if not valid_utf8(sender):
            await self.push("501 5.1.7 Bad sender address syntax")
            return
        if not smtputf8 and not sender.isascii():
            await self._refuse("smtputf8", "MAIL",
                               "553 5.6.7 Error: non-ASCII address without SMTPUTF8", sender)
            return
        if self._shared.free_space.problem() is not None:
            await self._refuse("storage_full", "MAIL", SHORT_OF_SPACE, sender)
            return
        if not self._shared.limits.allow_message(self.client_ip):
            await self._refuse("rate_limit", "MAIL",
                               f"450 4.7.1 Error: too much mail from {self.client_ip}", sender)
            return
        envelope.spf = await checked(self._settings.spf, self.client_ip, sender,
                                     self.session.host_name)
        envelope.mail_from = sender
        envelope.mail_options.extend(p.upper() for p in params)
        envelope.smtp_utf8 = smtputf8
        envelope.body_8bitmime = body_8bitmime
        envelope.dsn = dsn
        self._arrival = self._shared.gathering.arriving()  # for the writer's commit_delay
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
        if len(envelope.rcpt_tos) >= self._settings.max_recipients:
            await self._refuse("too_many_recipients", "RCPT",
                               "452 4.5.3 Error: too many recipients", sender)
            return
        try:
            path, params = split_path(rest)
        except PathSyntaxError:
            await self._refuse("recipient_syntax", "RCPT",
                               "501 5.1.3 Bad recipient address syntax", sender)
            return
        dsn = rcpt_params(params, self.session.extended_smtp, envelope.smtp_utf8)
        if isinstance(dsn, str):  # RFC 3461 NOTIFY, ORCPT; nothing else
            await self.push(dsn)
            return
        if not valid_utf8(path):
            await self._refuse("recipient_syntax", "RCPT",
                               "501 5.1.3 Bad recipient address syntax", sender)
            return
        if not envelope.smtp_utf8 and not path.isascii():
            await self._refuse("smtputf8", "RCPT",
                               "553 5.6.7 Error: non-ASCII address without SMTPUTF8", sender)
            return
        verdict = await self._settings.policy.verdict(path)  # a callout may ask the next hop
        if verdict is not None:
            reason = POLICY_REASONS.get(verdict.code, "recipient")
            await self._refuse(reason, "RCPT", str(verdict), sender, path)
            return
        local, _, domain = path.rpartition("@")
        if domain.endswith("."):  # the policy allowed one final dot; next hops may not
            path = path[:-1]
        key = f"{local.lower()}@{host_key(domain)}"  # either spelling of a domain is one
        if key not in envelope.rcpt_keys:  # the same mailbox twice is delivered once
            envelope.rcpt_keys.add(key)
            envelope.rcpt_tos.append(path)
            envelope.rcpt_dsn.append(dsn)
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
            receiver = DataReceiver(self._settings.max_size, self._shared.inflight)
            arrival = self._arrival
            try:
                if not await self._read_data(receiver):
                    return  # the client went away
                problem = receiver.problem
                if problem is None:
                    reply = await self._accept(envelope, receiver.blocks, arrival)
                else:
                    await self._refuse(DATA_PROBLEMS[problem], "DATA", problem,
                                       envelope.mail_from or "", ",".join(envelope.rcpt_tos))
                    reply = ""
            finally:
                arrival.end()
                receiver.release()  # stored or dropped: its bytes are no longer held
            self._set_post_data_state()
            if reply:
                await self.push(reply)
        finally:
            self._busy = False
        if self._shared.closing:
            self._say_goodbye(self._shared.shutting_down)
        elif self._cap.expired:  # smtp.max_session_time
            self._timeout_cb()

    async def _read_data(self, receiver: DataReceiver) -> bool:
        """Read up to `<CRLF>.<CRLF>` into `receiver`: the unstuffed data in
        blocks of whole lines (index 0 left free for our Received header), or
        the reply that will reject them; False if the client went away first.

        Only CRLF ends a line, so a bare LF or CR stays inside one for
        `_accept` to find, and `\\n.\\r\\n` never ends the data. After a problem
        the rest is drained, never stored, and answered once the client is done.
        Reads take all that has arrived (not a line at a time); what follows the
        final dot goes back to the reader for the command loop.
        """
        reader = self._reader
        clock = self.loop.time
        self._in_data = True
        settings = self._settings
        deadline = self._deadline = DataDeadline.starting(clock(), settings.data_timeout,
                                                          settings.min_data_rate)
        self._reset_timeout(self._settings.data_timeout)
        try:
            while True:
                chunk = await reader.read(_WHOLE_BUFFER)
                if not chunk:
                    if self.transport is not None:
                        self.transport.close()
                    return False
                deadline.fed(clock(), len(chunk))
                end = receiver.feed(chunk)
                if end >= 0:
                    give_back(reader, chunk[end:])
                    break
        finally:
            self._in_data = False
            if self.transport is not None:  # else the session is over: no new timer
                self._reset_timeout()
        return True

    async def _accept(self, envelope: RelayEnvelope, blocks: list[bytes],
                      arrival: Arrival) -> str:
        """Check the joined message once, then store it; the reply to the final dot."""
        shared = self._shared
        queue_id = shared.id_factory()
        now = shared.clock.now()
        blocks[0] = (prepended(self.hostname, envelope.spf)
                     + self._received_header(envelope, queue_id, now))
        start = len(blocks[0])
        data = b"".join(blocks)
        blocks.clear()
        problem = None
        ends = data.count(b"\r\n", start)  # each line's own CRLF: any other CR or LF is bare
        if data.count(b"\n", start) != ends or data.count(b"\r", start) != ends:
            problem = BARE_CR_LF
        elif data.find(b"\x00", start) >= 0:
            problem = NUL_BYTE
        elif count_received(data, start) > MAX_HOPS:
            problem = TOO_MANY_HOPS
        sender = envelope.mail_from or ""
        recipients = tuple(envelope.rcpt_tos)
        if problem is not None:
            await self._refuse(DATA_PROBLEMS[problem], "DATA", problem, sender,
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
            client_helo=printable(self.session.host_name or ""),
            smtputf8=envelope.smtp_utf8,
            eightbit=envelope.body_8bitmime or not data.isascii(),
            dsn=envelope.dsn,
            rcpt_dsn=envelope.recipient_params(),
            spf=envelope.spf.result if envelope.spf is not None else None,
        )
        try:
            await shared.store(message, arrival)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            trace = not isinstance(exc, QueueError)  # ours say it all in one line
            log.error("%s: not queued, storage failed: %s", queue_id, exc, exc_info=trace)
            shared.reject("storage")
            maillog.rejected(self.client_ip, "DATA", STORAGE_FAILED, sender, ",".join(recipients))
            return STORAGE_FAILED
        shared.accepted()
        maillog.queued(queue_id, sender, recipients, len(data), self.client_ip,
                       message.client_helo)
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _received_header(self, envelope: RelayEnvelope, queue_id: str, now: datetime) -> bytes:
        assert self.session is not None
        if not self.session.extended_smtp:
            protocol = "SMTP"
        else:
            protocol = "ESMTPS" if self.session.ssl is not None else "ESMTP"
        return received_header(self.session.host_name or "", self.client_ip, self.hostname,
                               protocol, queue_id, envelope.rcpt_tos, now)

    # -- ETRN (RFC 1985) -----------------------------------------------------

    async def smtp_ETRN(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self._envelope().mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        answer = await answer_etrn(arg or "", self.client_ip, self._settings, self._shared)
        if answer.refused is not None:
            await self._refuse(answer.refused, "ETRN", answer.reply)
        else:
            await self.push(answer.reply)
