"""A scriptable SMTP server on loopback, for tests: the "primary MX" we deliver to.

Owns: accepting real SMTP sessions (aiosmtpd) on a 127.x.y.z address from a
background thread with its own event loop, so it serves both in-process async
code and a relay started as a subprocess; recording every session (peer,
EHLO/HELO name, TLS) and every message (envelope, MAIL options, the exact
bytes of DATA after dot-unstuffing); scripted replies (per recipient RCPT,
MAIL, DATA, EHLO, a refusing greeting, dropping the connection at a given
command); optional STARTTLS with a trustme certificate; stop/start on the same
port so tests can take the "primary" down and bring it back.

Refuses: delivering or storing anything, AUTH, and any waiting by sleeping:
tests wait for messages or sessions with `wait_for_messages` /
`wait_for_sessions` (a `threading.Condition`), or their async twins.

Typical use::

    async def test_x(smtp_sink):
        sink = smtp_sink(tls=True)                  # 127.0.0.1, ephemeral port
        sink.rcpt_reply["bob@verrotech.com"] = "550 5.1.1 no such user"
        ...                                          # deliver to sink.host, sink.port
        [msg] = sink.wait_for_messages(1)
        assert msg.data == expected_bytes and msg.tls
        sink.stop()                                  # port now refuses connections
        sink.start()                                 # same port again
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

DEFAULT_REFUSAL = "421 4.3.2 Service not available, closing transmission channel"
_STARTUP_TIMEOUT = 10.0

__all__ = [
    "DEFAULT_REFUSAL",
    "ReceivedMessage",
    "SessionRecord",
    "Sink",
    "closed_port",
    "sink_ca",
    "smtp_sink",
]


@dataclass
class SessionRecord:
    """One TCP connection the sink accepted (or refused with its greeting)."""

    peer: tuple[str, int]
    ehlo_name: str | None = None  # the EHLO or HELO argument, last one sent
    esmtp: bool = False  # EHLO (True) or HELO (False) was the last greeting
    tls: bool = False  # STARTTLS completed on this connection
    refused: bool = False  # answered with the refusal greeting and closed
    commands: list[str] = field(default_factory=list)  # verbs seen, in order


@dataclass(frozen=True)
class ReceivedMessage:
    """One DATA transaction the sink completed, whatever it answered."""

    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]  # only the recipients the sink accepted
    mail_options: tuple[str, ...]  # upper-cased, e.g. ("BODY=8BITMIME", "SMTPUTF8")
    data: bytes  # exactly what was sent between DATA and <CRLF>.<CRLF>, unstuffed
    reply: str  # what the sink answered to the end of data
    tls: bool
    ehlo_name: str | None
    peer: tuple[str, int]
    # with `dsn=True`: RET/ENVID and (recipient, NOTIFY/ORCPT) exactly as sent
    dsn_mail: tuple[str, ...] = ()
    dsn_rcpt: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("2")

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.mail_options

    @property
    def body(self) -> str | None:
        """The BODY= parameter ("8BITMIME", "7BIT") or None."""
        for option in self.mail_options:
            if option.startswith("BODY="):
                return option[5:]
        return None

    @property
    def size(self) -> int | None:
        """The SIZE= parameter, or None."""
        for option in self.mail_options:
            if option.startswith("SIZE="):
                return int(option[5:])
        return None


@functools.cache
def sink_ca() -> trustme.CA:
    """The test CA that signs every sink's certificate (one per test process)."""
    return trustme.CA()


def _server_context(*names: str) -> ssl.SSLContext:
    """A STARTTLS context whose certificate (signed by `sink_ca()`) names `names`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    identities = dict.fromkeys(("localhost", "127.0.0.1", *names))
    sink_ca().issue_cert(*identities).configure_cert(ctx)
    return ctx


def closed_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with the session record the sink keeps for this connection."""

    def __init__(self, sink: Sink, record: SessionRecord, **kwargs: Any) -> None:
        super().__init__(_Handler(sink), **kwargs)
        self.sink = sink
        self.record = record
        self.dsn_mail: tuple[str, ...] = ()
        self.dsn_rcpt: list[tuple[str, tuple[str, ...]]] = []

    async def smtp_MAIL(self, arg: str) -> None:
        """With `sink.dsn`, RET and ENVID are taken out (and kept as sent) before
        aiosmtpd, which knows no DSN, sees the rest."""
        self.dsn_mail, self.dsn_rcpt = (), []
        if self.sink.dsn and arg:
            arg, self.dsn_mail = _take_params(arg, ("RET", "ENVID"))
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        taken: tuple[str, ...] = ()
        if self.sink.dsn and arg:
            arg, taken = _take_params(arg, ("NOTIFY", "ORCPT"))
        before = len(self.envelope.rcpt_tos) if self.envelope is not None else 0
        await super().smtp_RCPT(arg)
        if self.envelope is not None and len(self.envelope.rcpt_tos) > before:
            self.dsn_rcpt.append((self.envelope.rcpt_tos[-1], taken))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection, not the STARTTLS layer
            self.record.peer = _peer(transport)
        self.sink._track(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        transports = (self.transport, self._original_transport)
        super().connection_lost(error)
        for transport in transports:
            self.sink._untrack(transport)


def _take_params(arg: str, keys: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """`arg` without the parameters named `keys`, and those parameters as sent."""
    words = arg.split(" ")
    taken = tuple(w for w in words[1:] if w.partition("=")[0].upper() in keys)
    return " ".join(w for w in words if w not in taken), taken


class _Refuser(asyncio.Protocol):
    """Sends the refusal greeting (e.g. 421) and closes, as a busy server does."""

    def __init__(self, sink: Sink, record: SessionRecord, reply: str) -> None:
        self._sink = sink
        self._record = record
        self._reply = reply
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._record.peer = _peer(transport)
        self._transport = transport
        self._sink._track(transport)
        transport.write(self._reply.encode() + b"\r\n")
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink._untrack(self._transport)


class _Handler:
    """aiosmtpd hooks: record what the client said, answer what the test scripted."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    @staticmethod
    def _record(server: SMTP) -> SessionRecord:
        assert isinstance(server, _SinkSMTP)
        return server.record

    async def _maybe_drop(self, server: SMTP, verb: str) -> None:
        if self._sink.disconnect_on == verb:
            # Close without answering; connection_lost cancels this coroutine.
            assert server.transport is not None
            server.transport.close()
            await asyncio.Event().wait()
        if self._sink.stall_on == verb:
            # Never answer; the client's timeout ends it (connection_lost cancels this).
            await asyncio.Event().wait()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        record = self._record(server)
        record.commands.append("EHLO")
        await self._maybe_drop(server, "EHLO")
        if self._sink.ehlo_reply is not None:
            return [self._sink.ehlo_reply]
        record.ehlo_name = hostname
        record.esmtp = True
        session.host_name = hostname
        drop = set()
        if not self._sink.eightbitmime:
            drop.add("8BITMIME")
        if self._sink.hide_starttls:
            drop.add("STARTTLS")
        kept = [r for r in responses[:-1] if r[4:].split(" ")[0].upper() not in drop]
        if self._sink.dsn:
            kept.append("250-DSN")
        return [*kept, responses[-1]]

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        record = self._record(server)
        record.commands.append("HELO")
        record.ehlo_name = hostname
        record.esmtp = False
        session.host_name = hostname
        return f"250 {server.hostname}"

    def handle_STARTTLS(self, server: SMTP, session: Session, envelope: Envelope) -> bool:
        self._record(server).tls = True
        return True

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._record(server).commands.append("QUIT")
        return "221 2.0.0 Bye"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._record(server).commands.append("RSET")
        return "250 2.0.0 Ok"

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self._record(server).commands.append("MAIL")
        await self._maybe_drop(server, "MAIL")
        if self._sink.mail_reply is not None:
            return self._sink.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self._record(server).commands.append("RCPT")
        await self._maybe_drop(server, "RCPT")
        scripted = self._sink.rcpt_reply.get(address)
        if scripted is None:
            scripted = self._sink.rcpt_reply.get(address.lower())
        if scripted is not None and not scripted.startswith("2"):
            return scripted
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return scripted or "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        record = self._record(server)
        record.commands.append("DATA")
        await self._maybe_drop(server, "DATA")
        await self._sink._pass_gate()
        if self._sink.data_delay:
            await asyncio.sleep(self._sink.data_delay)  # a slow server, not a synchronisation
        reply = self._sink.data_reply or f"250 2.0.0 Ok: queued as {self._sink._next_id()}"
        sender = envelope.mail_from or ""
        message = ReceivedMessage(
            sender="" if sender == "<>" else sender,
            recipients=tuple(envelope.rcpt_tos),
            mail_options=tuple(envelope.mail_options),
            data=bytes(envelope.original_content or b""),
            reply=reply,
            tls=record.tls,
            ehlo_name=record.ehlo_name,
            peer=record.peer,
            dsn_mail=server.dsn_mail if isinstance(server, _SinkSMTP) else (),
            dsn_rcpt=tuple(server.dsn_rcpt) if isinstance(server, _SinkSMTP) else (),
        )
        self._sink._add_message(message)
        return reply


class Sink:
    """An SMTP server on (host, port) whose answers tests script while it runs.

    Scripting attributes (read by the server at each command, set them any time):

    * ``rcpt_reply[address] = "550 5.1.1 no such user"`` (or ``"450 ..."``);
      unlisted recipients get ``250``;
    * ``mail_reply``, ``data_reply``, ``ehlo_reply``: a full reply line replacing
      the normal answer to MAIL FROM, to the end of DATA, to EHLO;
    * ``refuse_sessions = True``: every new connection gets ``refusal`` (421 by
      default) as its greeting and is closed;
    * ``disconnect_on = "MAIL" | "RCPT" | "DATA" | "EHLO"``: close the
      connection instead of answering that command (for DATA: after the data);
    * ``stall_on``: the same verbs, but the connection stays open, unanswered;
    * ``eightbitmime`` / ``hide_starttls``: what EHLO advertises;
    * ``dsn = True``: EHLO advertises DSN and RET/ENVID/NOTIFY/ORCPT are
      accepted and recorded as sent (`ReceivedMessage.dsn_mail`, `dsn_rcpt`);
      without it, as aiosmtpd does, they get 555;
    * ``data_delay``: seconds a slow next hop takes to answer each DATA (its
      content received first), so a drain lasts while a test acts on it;

    Constructor options: ``tls`` (True for a trustme certificate signed by
    `sink_ca()`, or an `ssl.SSLContext`) enables STARTTLS; ``smtputf8``
    (default True) advertises and accepts SMTPUTF8; ``hostname`` is the name
    in the greeting; ``data_size_limit`` is advertised as SIZE; ``hold_data``
    keeps every DATA (its content received) unanswered until `release_data()`
    (`wait_for_held` counts them; `hold_data()` starts that later): deliveries
    in flight on demand.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: bool | ssl.SSLContext = False,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        hostname: str = "sink.test",
        data_size_limit: int = 33554432,
        refuse_sessions: bool = False,
        refusal: str = DEFAULT_REFUSAL,
        hold_data: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        self.smtputf8 = smtputf8
        self.data_size_limit = data_size_limit
        if isinstance(tls, ssl.SSLContext):
            self.tls_context: ssl.SSLContext | None = tls
        else:
            self.tls_context = _server_context(host, hostname) if tls else None

        self.rcpt_reply: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.ehlo_reply: str | None = None
        self.refuse_sessions = refuse_sessions
        self.refusal = refusal
        self.disconnect_on: str | None = None
        self._holding = hold_data  # DATA waits, content received, until release_data()
        self._held = 0
        self._gate: asyncio.Event  # made in the loop
        self.stall_on: str | None = None
        self.eightbitmime = eightbitmime
        self.hide_starttls = False
        self.dsn = False
        self.data_delay = 0.0

        self._cond = threading.Condition()
        self._sessions: list[SessionRecord] = []
        self._received: list[ReceivedMessage] = []
        self._ids = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._idle: asyncio.Event  # set when no connection is open; made in the loop

    # ------------------------------------------------------------ records

    @property
    def sessions(self) -> list[SessionRecord]:
        """Every connection so far, refused ones included (a copy)."""
        with self._cond:
            return list(self._sessions)

    @property
    def received(self) -> list[ReceivedMessage]:
        """Every completed DATA transaction, whatever the sink answered (a copy)."""
        with self._cond:
            return list(self._received)

    @property
    def messages(self) -> list[ReceivedMessage]:
        """The messages the sink answered 2xx to: what was delivered (a copy)."""
        with self._cond:
            return [m for m in self._received if m.accepted]

    @property
    def session_count(self) -> int:
        with self._cond:
            return len(self._sessions)

    @property
    def message_count(self) -> int:
        """How many messages were delivered (answered 2xx)."""
        return len(self.messages)

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until `count` messages were delivered; return all delivered so far."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(m.accepted for m in self._received) >= count, timeout
            )
            got = [m for m in self._received if m.accepted]
        if not ok:
            raise TimeoutError(f"sink {self.address}: {len(got)} of {count} messages in {timeout}s")
        return got

    def wait_for_sessions(self, count: int = 1, timeout: float = 10.0) -> list[SessionRecord]:
        """Block until `count` sessions were opened; return all so far."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self._sessions) >= count, timeout)
            got = list(self._sessions)
        if not ok:
            raise TimeoutError(f"sink {self.address}: {len(got)} of {count} sessions in {timeout}s")
        return got

    async def await_messages(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """`wait_for_messages` without blocking the caller's event loop."""
        return await asyncio.to_thread(self.wait_for_messages, count, timeout)

    async def await_sessions(self, count: int = 1, timeout: float = 10.0) -> list[SessionRecord]:
        """`wait_for_sessions` without blocking the caller's event loop."""
        return await asyncio.to_thread(self.wait_for_sessions, count, timeout)

    def wait_until(self, predicate: Callable[[list[ReceivedMessage]], bool],
                   timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until `predicate(delivered messages)` holds; return them."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: predicate([m for m in self._received if m.accepted]), timeout)
            got = [m for m in self._received if m.accepted]
        if not ok:
            raise TimeoutError(f"sink {self.address}: condition not met in {timeout}s "
                               f"({len(got)} messages)")
        return got

    def wait_for_held(self, count: int, timeout: float = 10.0) -> None:
        """With ``hold_data``: block until `count` DATA commands are waiting."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._held >= count, timeout):
                raise TimeoutError(f"sink {self.address}: {self._held} of {count} held")

    def hold_data(self) -> None:
        """From now on DATA waits (its content received) until `release_data()`."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._gate.clear)
        self._holding = True

    def release_data(self) -> None:
        """Let every held DATA (and every later one) be answered."""
        assert self._loop is not None
        self._holding = False
        self._loop.call_soon_threadsafe(self._gate.set)

    async def _pass_gate(self) -> None:
        if not self._holding:
            return
        with self._cond:
            self._held += 1
            self._cond.notify_all()
        await self._gate.wait()

    def clear(self) -> None:
        """Forget recorded sessions and messages (scripted replies stay)."""
        with self._cond:
            self._sessions.clear()
            self._received.clear()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def _add_session(self, record: SessionRecord) -> None:
        with self._cond:
            self._sessions.append(record)
            self._cond.notify_all()

    def _add_message(self, message: ReceivedMessage) -> None:
        with self._cond:
            self._received.append(message)
            self._cond.notify_all()

    def _next_id(self) -> str:
        with self._cond:
            self._ids += 1
            return f"SINK{self._ids:06d}"

    def _track(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._transports.add(transport)

    def _untrack(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._transports.discard(transport)
            if not self._transports:
                self._idle.set()

    # ---------------------------------------------------------- lifecycle

    def start(self) -> Sink:
        """Listen (again) on host:port; the first start picks the port if it was 0."""
        if self._thread is None:
            self._start_thread()
        assert self._loop is not None
        if self._server is None:
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(_STARTUP_TIMEOUT)
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection: the port refuses connections."""
        if self._loop is None or self._server is None:
            return
        asyncio.run_coroutine_threadsafe(self._unlisten(), self._loop).result(_STARTUP_TIMEOUT)

    def close(self) -> None:
        """Stop and end the background thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_STARTUP_TIMEOUT)
        self._loop = self._thread = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_thread(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"smtp-sink-{self.host}", daemon=True)
        self._thread.start()
        if not ready.wait(_STARTUP_TIMEOUT):
            raise RuntimeError("smtp sink thread did not start")

    def _protocol(self) -> asyncio.BaseProtocol:
        """A protocol for one new connection (called by the server, in the loop)."""
        assert self._loop is not None
        record = SessionRecord(peer=("", 0), refused=self.refuse_sessions)
        self._add_session(record)
        if record.refused:
            return _Refuser(self, record, self.refusal)
        return _SinkSMTP(
            self,
            record,
            hostname=self.hostname,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
            tls_context=self.tls_context,
            data_size_limit=self.data_size_limit,
            loop=self._loop,
        )

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._gate = asyncio.Event()
        server = await loop.create_server(self._protocol, self.host, self.port, reuse_address=True)
        self.port = int(server.sockets[0].getsockname()[1])
        self._server = server

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for transport in list(self._transports):
            transport.abort()
        await server.wait_closed()
        # Report "stopped" only once every aborted connection ran connection_lost.
        if self._transports:
            self._idle.clear()
            await self._idle.wait()


def _peer(transport: asyncio.BaseTransport) -> tuple[str, int]:
    peer = transport.get_extra_info("peername")
    return (str(peer[0]), int(peer[1])) if peer else ("", 0)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


@pytest.fixture
def smtp_sink() -> Iterator[Callable[..., Sink]]:
    """A factory: ``smtp_sink(host="127.0.0.1", port=0, **options) -> Sink`` (started).

    Every sink it made is closed at teardown.
    """
    sinks: list[Sink] = []

    def start(host: str = "127.0.0.1", port: int = 0, **options: Any) -> Sink:
        sink = Sink(host, port, **options)
        sinks.append(sink)
        return sink.start()

    yield start
    for sink in sinks:
        with contextlib.suppress(Exception):
            sink.close()
