"""The SMTP accept side over real loopback sockets, storing into a real SQLite queue."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event, select, text

from relay.core import config as config_module
from relay.core.clock import FakeClock
from relay.ops.metrics import Metrics
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import NewMessage, QueueError
from relay.queue.schema import messages, recipients
from relay.queue.store import Store
from relay.smtp import server as smtpd
from relay.smtp.data import LINE_TOO_LONG, DataReceiver
from relay.smtp.listeners import Listeners, start_listeners
from relay.smtp.policy import Policy
from tests.support.smtp_lines import LineClient, Reply

HOST = "mail.verrotech.net"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DATE = "Sun, 01 Mar 2026 12:00:00 +0000"
BODY = b"From: a@sender.example\r\nTo: bob@verrotech.com\r\nSubject: hi\r\n\r\nhello\r\n"


# -- a raw SMTP client: exact bytes in, replies out -------------------------------


class Client(LineClient[Reply]):
    """Replies whole: code, texts, raw lines."""

    def shaped(self, reply: Reply) -> Reply:
        return reply

    async def send(self, data: bytes) -> None:
        await self.write(data)

    async def ehlo(self, name: str = "client.example") -> Reply:
        return await self.cmd(f"EHLO {name}")

    async def transaction(self, sender: str, rcpts: list[str], data: bytes,
                          mail_params: str = "") -> Reply:
        """MAIL, RCPT..., DATA, the data dot-stuffed as given (no stuffing added)."""
        assert (await self.cmd(f"MAIL FROM:<{sender}>{mail_params}")).code == 250
        for rcpt in rcpts:
            reply = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.code == 250, reply
        assert (await self.cmd("DATA")).code == 354
        await self.send(data + b".\r\n")
        return await self.reply()

    async def at_eof(self) -> bytes:
        """Everything until the server closes the connection. A server that
        closes with our unread commands in its buffer resets the connection
        (RST, not FIN): what it said before still counts."""
        said = b""
        async with asyncio.timeout(20):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    return said
                if not chunk:
                    return said
                said += chunk


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    engine = db.connect(f"sqlite:///{tmp_path}/q.db")
    db.upgrade(engine)
    return Queue(engine)


def make_config(tmp_path: Path, smtp: dict[str, Any] | None = None,
                domains: dict[str, Any] | None = None) -> config_module.Config:
    (tmp_path / "recipients.txt").write_text("# staff\nbob\nalice@files.example\n")
    data = {
        "node": {"hostname": HOST},
        "smtp": {"listen": ["127.0.0.1:0"], **(smtp or {})},
        "domains": domains if domains is not None else {
            "verrotech.com": {"recipients": ["bob", "carol@verrotech.com"]},
            "verrotech.org": {},
            "files.example": {"recipients_file": "recipients.txt"},
        },
    }
    return config_module.from_mapping(data, env={}, base=tmp_path)


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"01TEST{self.n:04d}"


@dataclass
class Relay:
    listeners: Listeners
    queue: Queue
    clock: FakeClock
    etrn_calls: list[str]

    @property
    def address(self) -> tuple[str, int]:
        return self.listeners.addresses[0]

    async def client(self, ehlo: str | None = "client.example") -> Client:
        client = await Client.connect(self.address)
        banner = await client.reply()
        assert banner.last == f"220 {HOST} ESMTP mx-relay"
        if ehlo:
            assert (await client.ehlo(ehlo)).code == 250
        return client

    def rows(self) -> list[Any]:
        with self.queue.engine.connect() as conn:
            return list(conn.execute(select(messages).order_by(messages.c.id)))

    def recipients_of(self, message_id: str) -> list[str]:
        with self.queue.engine.connect() as conn:
            return list(conn.execute(
                select(recipients.c.address).where(recipients.c.message_id == message_id)
                .order_by(recipients.c.id)).scalars())


StartRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start(tmp_path: Path, queue: Queue) -> AsyncIterator[StartRelay]:
    running: list[Listeners] = []

    async def start_relay(
        smtp: dict[str, Any] | None = None, domains: dict[str, Any] | None = None,
        submit: Callable[[NewMessage], Awaitable[None]] | None = None,
        on_etrn: Callable[[str], Awaitable[object]] | None = None,
        metrics: Metrics | None = None,
    ) -> Relay:
        config = make_config(tmp_path, smtp, domains)
        clock = FakeClock(T0)
        calls: list[str] = []

        async def record_etrn(domain: str) -> None:
            calls.append(domain)

        listeners = await start_listeners(
            config,
            submit or (lambda m: asyncio.to_thread(queue.put_many, [m])),
            id_factory=Ids(),
            clock=clock,
            on_etrn=on_etrn or record_etrn,
            policy=Policy(config, recheck_interval=0),
            metrics=metrics,
        )
        running.append(listeners)
        return Relay(listeners, queue, clock, calls)

    yield start_relay
    for listeners in running:
        listeners.abort()
        await listeners.wait_closed()


@pytest.fixture
async def relay(start: StartRelay) -> Relay:
    return await start()


def received_header(queue_id: str, rcpt: str | None = "bob@verrotech.com",
                    helo: str = "client.example", protocol: str = "ESMTP") -> bytes:
    head = (f"Received: from {helo} (unknown [127.0.0.1])\r\n"
            f"\tby {HOST} (mx-relay) with {protocol} id {queue_id}")
    tail = f"\r\n\tfor <{rcpt}>; {DATE}\r\n" if rcpt else f";\r\n\t{DATE}\r\n"
    return (head + tail).encode()


# -- greeting, EHLO, stock replies -----------------------------------------------


async def test_banner_and_ehlo_keywords(relay: Relay) -> None:
    client = await relay.client(ehlo=None)
    reply = await client.ehlo()
    assert reply.lines == [HOST, "SIZE 35000000", "8BITMIME", "PIPELINING",
                           "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"]
    assert (await client.cmd("AUTH PLAIN AGJvYgBzZWNyZXQ=")).last.startswith("500 5.5.2 ")
    await client.close()


async def test_every_stock_reply_carries_an_enhanced_code(relay: Relay) -> None:
    client = await relay.client(ehlo=None)
    assert (await client.cmd("MAIL FROM:<a@b.example>")).last == "503 5.5.1 Error: send HELO first"
    assert (await client.cmd("EHLO")).code == 501
    await client.ehlo()
    replies = [
        await client.cmd("RCPT TO:<bob@verrotech.com>"),
        await client.cmd("DATA"),
        await client.cmd("MAIL FROM:"),
        await client.cmd("MAIL FROM:<a@b.example> MT-PRIORITY=3"),
        await client.cmd("MAIL FROM:<a@b.example> SIZE=big"),
        await client.cmd("MAIL FROM:<bob>"),
        await client.cmd("BOGUS"),
        await client.cmd("VRFY bob@verrotech.com"),
        await client.cmd("EXPN staff"),
        await client.cmd("STARTTLS"),
        await client.cmd("ETRN"),
        await client.cmd("HELP"),
        await client.cmd("NOOP"),
        await client.cmd("RSET"),
    ]
    assert [r.last for r in replies] == [
        "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command",
        "501 5.5.4 Syntax: MAIL FROM:<address>",
        "555 5.5.4 Unsupported option: MT-PRIORITY",
        "501 5.5.4 Bad SIZE parameter",
        "501 5.1.7 Bad sender address syntax",
        '500 5.5.2 Error: command "BOGUS" not recognized',
        "502 5.5.1 VRFY command is disabled",
        "502 5.5.1 EXPN command is disabled",
        "502 5.5.1 Error: command not implemented",
        "501 5.5.4 Syntax: ETRN <domain>",
        "214 2.0.0 Commands: DATA EHLO ETRN HELO HELP MAIL NOOP QUIT RCPT RSET",
        "250 2.0.0 Ok",
        "250 2.0.0 Ok",
    ]
    assert (await client.cmd("MAIL FROM:<a@b.example>")).last == "250 2.1.0 Ok"
    assert (await client.cmd("MAIL FROM:<a@b.example>")).last == (
        "503 5.5.1 Error: nested MAIL command")
    assert (await client.cmd("RCPT TO:<bob@verrotech.com> RRVS=2026-12-05T00:00:00Z")).last == (
        "555 5.5.4 Unsupported option: RRVS")
    assert (await client.cmd("RCPT TO:<bob@other.example")).last == (
        "501 5.1.3 Bad recipient address syntax")
    assert (await client.cmd("DATA")).last == "554 5.5.1 Error: no valid recipients"
    assert (await client.cmd("QUIT")).last == "221 2.0.0 Bye"
    assert await client.at_eof() == b""
    await client.close()


# -- RCPT: relay access, unknown users, limits ------------------------------------


@pytest.mark.parametrize(
    "rcpt",
    [
        "bob@other.example",
        "bob%other.example@verrotech.org",
        "other.example!bob@verrotech.org",
        "bob@other.example@verrotech.org",
        '"bob@other.example"@verrotech.org',
        '"bob"@verrotech.org',
        "@verrotech.org:bob@other.example",
        "@verrotech.org,@verrotech.com:bob@verrotech.org",
        "bob@verrotech.org.other.example",
        "bob@[127.0.0.1]",
        "postmaster",
    ],
)
async def test_relay_access_denied(relay: Relay, rcpt: str) -> None:
    client = await relay.client()
    assert (await client.cmd("MAIL FROM:<a@sender.example>")).code == 250
    reply = await client.cmd(f"RCPT TO:<{rcpt}>")
    assert reply.last == f"554 5.7.1 <{rcpt}>: Relay access denied"
    assert (await client.cmd("DATA")).code == 554  # nothing was accepted
    await client.close()
    assert relay.rows() == []


async def test_relay_denied_without_angle_brackets(relay: Relay) -> None:
    client = await relay.client()
    await client.cmd("MAIL FROM:a@sender.example")
    reply = await client.cmd("RCPT TO:bob@verrotech.com,bob@other.example")
    assert reply.code == 554
    assert (await client.cmd("RCPT TO:bob@verrotech.org")).last == "250 2.1.5 Ok"
    await client.close()


async def test_unknown_user_from_list(relay: Relay) -> None:
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@sender.example>")
    for ok in ("bob@verrotech.com", "BOB@VerroTech.com", "carol@verrotech.com"):
        assert (await client.cmd(f"RCPT TO:<{ok}>")).last == "250 2.1.5 Ok"
    reply = await client.cmd("RCPT TO:<dave@verrotech.com>")
    assert reply.last == "550 5.1.1 <dave@verrotech.com>: Recipient address rejected: User unknown"
    await client.close()


async def test_recipients_file_edited_at_runtime_and_unreadable(relay: Relay,
                                                                tmp_path: Path) -> None:
    path = tmp_path / "recipients.txt"
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@sender.example>")
    assert (await client.cmd("RCPT TO:<bob@files.example>")).code == 250
    assert (await client.cmd("RCPT TO:<alice@files.example>")).code == 250
    assert (await client.cmd("RCPT TO:<zoe@files.example>")).last == (
        "550 5.1.1 <zoe@files.example>: Recipient address rejected: User unknown")
    path.write_text("bob\nzoe  OK\n")
    assert (await client.cmd("RCPT TO:<zoe@files.example>")).code == 250
    assert (await client.cmd("RCPT TO:<alice@files.example>")).code == 550
    path.unlink()
    assert (await client.cmd("RCPT TO:<bob@files.example>")).last == (
        "451 4.3.0 <bob@files.example>: Temporary lookup failure")
    assert (await client.cmd("RCPT TO:<anyone@files.example>")).code == 451
    path.write_text("anyone\n")
    assert (await client.cmd("RCPT TO:<anyone@files.example>")).code == 250
    await client.close()


async def test_too_many_recipients(start: StartRelay) -> None:
    relay = await start(smtp={"max_recipients": 2})
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@sender.example>")
    assert (await client.cmd("RCPT TO:<a@verrotech.org>")).code == 250
    assert (await client.cmd("RCPT TO:<b@verrotech.org>")).code == 250
    assert (await client.cmd("RCPT TO:<c@verrotech.org>")).last == (
        "452 4.5.3 Error: too many recipients")
    assert (await client.cmd("DATA")).code == 354
    await client.send(BODY + b".\r\n")
    reply = await client.reply()
    assert reply.code == 250
    assert relay.recipients_of("01TEST0001") == ["a@verrotech.org", "b@verrotech.org"]
    await client.close()


async def test_duplicate_recipients_are_kept_once(relay: Relay) -> None:
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@sender.example>")
    for rcpt in ("Ann@verrotech.org", "ann@verrotech.org", "ann@VERROTECH.ORG"):
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).code == 250
    await client.cmd("DATA")
    await client.send(BODY + b".\r\n")
    assert (await client.reply()).code == 250
    assert relay.recipients_of("01TEST0001") == ["Ann@verrotech.org"]
    await client.close()


# -- the happy path: 250 only after commit, exact bytes ----------------------------


async def test_message_is_queued_with_received_header_and_exact_bytes(relay: Relay) -> None:
    client = await relay.client()
    data = BODY + b"..leading dot\r\n"  # a dot-stuffed line
    reply = await client.transaction("a@sender.example", ["Bob@VerroTech.com"], data)
    assert reply.last == "250 2.0.0 Ok: queued as 01TEST0001"
    # The reply came after the commit: the row is there as soon as we read it.
    [row] = relay.rows()
    assert (row.id, row.sender, row.client_address, row.client_helo) == (
        "01TEST0001", "a@sender.example", "127.0.0.1", "client.example")
    assert (row.smtputf8, row.eightbit, row.destination) == (False, False, "verrotech.com")
    assert row.received_at == T0
    assert relay.recipients_of("01TEST0001") == ["Bob@VerroTech.com"]
    expected = received_header("01TEST0001", "Bob@VerroTech.com") + BODY + b".leading dot\r\n"
    assert relay.queue.raw("01TEST0001") == expected
    assert relay.listeners.stats.accepted == 1
    await client.close()


async def test_received_header_variants(relay: Relay) -> None:
    client = await relay.client(ehlo=None)
    assert (await client.cmd("HELO old.example")).last == f"250 {HOST}"
    reply = await client.transaction("", ["a@verrotech.org", "b@verrotech.org"], BODY)
    assert reply.code == 250
    raw = relay.queue.raw("01TEST0001")
    assert raw == received_header("01TEST0001", None, "old.example", "SMTP") + BODY
    assert relay.rows()[0].sender == ""
    await client.cmd("EHLO weird\x01name (with) spaces")
    assert (await client.transaction("a@b.example", ["a@verrotech.org"], BODY)).code == 250
    raw = relay.queue.raw("01TEST0002")
    assert raw.startswith(b"Received: from weird?name?(with)?spaces (unknown [127.0.0.1])\r\n")
    await client.close()


async def test_pipelined_transaction(relay: Relay) -> None:
    client = await relay.client()
    await client.send(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<x@other.example>\r\n"
                      b"RCPT TO:<a@verrotech.org>\r\nDATA\r\n")
    codes = [(await client.reply()).code for _ in range(4)]
    assert codes == [250, 554, 250, 354]
    await client.send(BODY + b".\r\nRSET\r\nQUIT\r\n")
    assert (await client.reply()).code == 250
    assert (await client.reply()).code == 250
    assert (await client.reply()).code == 221
    await client.close()


async def test_storage_failure_answers_451_and_keeps_nothing(relay: Relay) -> None:
    # The insert of the recipients fails after the body and message rows went in:
    # the transaction must roll all of it back.
    with relay.queue.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER fail BEFORE INSERT ON recipients "
                          "BEGIN SELECT RAISE(ABORT, 'disk full'); END"))
    client = await relay.client()
    reply = await client.transaction("a@sender.example", ["bob@verrotech.com"], BODY)
    assert reply.last == "451 4.3.0 Error: queue file write error"
    assert relay.rows() == []
    assert relay.queue.raw("01TEST0001") is None
    with relay.queue.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER fail"))
    reply = await client.transaction("a@sender.example", ["bob@verrotech.com"], BODY)
    assert reply.last == "250 2.0.0 Ok: queued as 01TEST0002"
    assert [r.id for r in relay.rows()] == ["01TEST0002"]
    await client.close()


async def test_any_submit_exception_is_451(start: StartRelay) -> None:
    async def broken(message: NewMessage) -> None:
        raise QueueError("database is locked")

    relay = await start(submit=broken)
    client = await relay.client()
    reply = await client.transaction("a@sender.example", ["bob@verrotech.com"], BODY)
    assert reply.last == "451 4.3.0 Error: queue file write error"
    assert relay.listeners.stats.rejections["storage"] == 1
    assert (await client.cmd("NOOP")).code == 250
    await client.close()


async def test_reply_waits_for_submit(start: StartRelay, queue: Queue) -> None:
    """Nothing is on the wire while submit is still running; 250 once it returned."""
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow(message: NewMessage) -> None:
        entered.set()
        await gate.wait()
        await asyncio.to_thread(queue.put_many, [message])

    relay = await start(submit=slow)
    # A plain blocking socket: a reply written before submit ran would already be
    # in its receive queue (loopback) when `entered` is set.
    sock = await asyncio.to_thread(socket.create_connection, relay.address, 20)
    with sock, sock.makefile("rb") as stream:
        await asyncio.to_thread(stream.readline)
        sock.sendall(b"HELO client.example\r\nMAIL FROM:<a@b.example>\r\n"
                     b"RCPT TO:<bob@verrotech.com>\r\nDATA\r\n")
        for _ in range(4):
            await asyncio.to_thread(stream.readline)
        sock.sendall(BODY + b".\r\n")
        await entered.wait()
        try:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(100, socket.MSG_PEEK)
            sock.settimeout(20)
            assert relay.rows() == []
        finally:
            gate.set()
        reply = await asyncio.to_thread(stream.readline)
        assert reply == b"250 2.0.0 Ok: queued as 01TEST0001\r\n"
        assert [r.id for r in relay.rows()] == ["01TEST0001"]


async def test_client_leaving_mid_commit_does_not_cut_the_commit(
    start: StartRelay, queue: Queue, caplog: pytest.LogCaptureFixture,
) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow(message: NewMessage) -> None:
        entered.set()
        await gate.wait()
        await asyncio.to_thread(queue.put_many, [message])

    relay = await start(submit=slow)
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@b.example>")
    await client.cmd("RCPT TO:<bob@verrotech.com>")
    await client.cmd("DATA")
    await client.send(BODY + b".\r\n")
    await entered.wait()
    await client.close()
    try:
        assert await relay.listeners.wait_sessions(20)  # the session is gone...
    finally:
        gate.set()
    relay.listeners.close()
    await relay.listeners.wait_closed()  # ...and wait_closed waited for its commit
    assert [r.id for r in relay.rows()] == ["01TEST0001"]
    assert "01TEST0001: client went away during the commit, which succeeded" in caplog.text


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_client(start: StartRelay) -> None:
    relay = await start(smtp={"listen": ["[::1]:0"], "etrn_clients": ["::1/128"]})
    client = await relay.client()
    assert (await client.cmd("ETRN verrotech.com")).code == 250
    assert (await client.transaction("a@b.example", ["bob@verrotech.com"], BODY)).code == 250
    assert relay.queue.raw("01TEST0001").startswith(  # type: ignore[union-attr]
        b"Received: from client.example (unknown [IPv6:::1])\r\n")
    assert relay.rows()[0].client_address == "::1"
    await client.close()


# -- sizes -------------------------------------------------------------------------


async def test_size_limit_at_mail_and_in_data(start: StartRelay) -> None:
    relay = await start(smtp={"max_message_size": 2000})
    client = await relay.client()
    assert (await client.ehlo()).lines[1] == "SIZE 2000"
    assert (await client.cmd("MAIL FROM:<a@b.example> SIZE=2001")).last == (
        "552 5.3.4 Message size exceeds fixed limit")
    assert (await client.cmd("MAIL FROM:<a@b.example> SIZE=2000")).code == 250
    assert (await client.cmd("RCPT TO:<a@verrotech.org>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 25)
    await client.send(b".\r\n")
    assert (await client.reply()).last == "552 5.3.4 Message size exceeds fixed limit"
    assert relay.rows() == []
    # The session goes on, and a message just under the limit is fine.
    body = b"Subject: ok\r\n\r\n" + (b"y" * 98 + b"\r\n") * 19
    assert len(body) <= 2000
    assert (await client.transaction("a@b.example", ["a@verrotech.org"], body)).code == 250
    await client.close()


# -- smuggling, NUL, long lines -------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: x\r\n\r\nbare\nLF\r\n",
        b"Subject: x\r\n\r\nbare\rCR\r\n",
        b"Subject: x\nTo: y\r\n\r\nbody\r\n",
        b"Subject: x\r\n\r\nends with CR\r\r\n",
    ],
)
async def test_bare_cr_or_lf_is_rejected(relay: Relay, data: bytes) -> None:
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@b.example>")
    await client.cmd("RCPT TO:<a@verrotech.org>")
    await client.cmd("DATA")
    await client.send(data + b".\r\n")
    assert (await client.reply()).last == "550 5.5.2 Error: bare <CR> or <LF> in message data"
    assert relay.rows() == []
    assert (await client.cmd("NOOP")).code == 250
    await client.close()


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r"])
async def test_smuggled_message_is_neither_ended_early_nor_queued(relay: Relay,
                                                                  fake_end: bytes) -> None:
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@b.example>")
    await client.cmd("RCPT TO:<a@verrotech.org>")
    await client.cmd("DATA")
    smuggled = (b"Subject: outer\r\n\r\nhello" + fake_end
                + b"MAIL FROM:<admin@verrotech.org>\r\nRCPT TO:<victim@verrotech.org>\r\n"
                b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n")
    await client.send(smuggled + b".\r\n")
    # Exactly one reply: the whole thing was one message, and it was refused.
    assert (await client.reply()).last == "550 5.5.2 Error: bare <CR> or <LF> in message data"
    assert (await client.cmd("NOOP")).last == "250 2.0.0 Ok"
    assert relay.rows() == []
    await client.close()


async def test_nul_byte_is_rejected_and_the_session_goes_on(relay: Relay) -> None:
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@b.example>")
    await client.cmd("RCPT TO:<a@verrotech.org>")
    await client.cmd("DATA")
    await client.send(b"Subject: x\r\n\r\nnul\x00here\r\n.\r\n")
    assert (await client.reply()).last == "554 5.6.0 Error: NUL byte in message data"
    assert relay.rows() == []
    assert (await client.transaction("a@b.example", ["a@verrotech.org"], BODY)).code == 250
    await client.close()


@pytest.mark.parametrize(
    "line",
    [
        b"x" * 999,  # one octet over 998
        b"y" * 1002,  # just past the reader's own limit
        b"z" * 100_000,  # far past it, arriving in many pieces
        b"w" * 5000 + b".",  # the tail left after the reader's limit looks like an end
    ],
)
async def test_long_lines_are_rejected_and_the_session_goes_on(relay: Relay, line: bytes) -> None:
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@b.example>")
    await client.cmd("RCPT TO:<a@verrotech.org>")
    await client.cmd("DATA")
    await client.send(b"Subject: x\r\n\r\n" + line + b"\r\nafter\r\n.\r\n")
    assert (await client.reply()).last == "554 5.6.0 Error: message line longer than 998 octets"
    assert relay.rows() == []
    assert (await client.transaction("a@b.example", ["a@verrotech.org"], BODY)).code == 250
    await client.close()


async def test_the_tail_of_an_overlong_line_never_ends_the_data() -> None:
    """Past the reader's limit a line is read in pieces; a last piece that is
    exactly ".\r\n" still belongs to that line and must not end the data
    (else the rest would run as commands: a desync). The reader is fed by hand
    because over a socket the split depends on timing."""
    class Reader(asyncio.StreamReader):
        """Says when all that was fed has been read: the task then waits for more."""

        fed = taken = 0
        drained = asyncio.Event()

        def feed_data(self, data: bytes) -> None:
            self.fed += len(data)
            self.drained.clear()
            super().feed_data(data)

        async def read(self, n: int = -1) -> bytes:
            data = await super().read(n)
            self.taken += len(data)
            if self.taken >= self.fed:
                self.drained.set()
            return data

    reader = Reader(limit=smtpd.RelaySMTP.line_length_limit)
    stub = SimpleNamespace(
        _reader=reader, loop=asyncio.get_running_loop(), transport=None,
        _settings=SimpleNamespace(max_size=10**6, data_timeout=60.0, min_data_rate=0),
        _in_data=False, _deadline=None, _reset_timeout=lambda *args: None,
    )
    receiver = DataReceiver(10**6)
    task = asyncio.create_task(smtpd.RelaySMTP._read_data(stub, receiver))  # type: ignore[arg-type]
    reader.feed_data(b"Subject: x\r\n\r\n" + b"w" * 5000 + b".")
    await asyncio.wait_for(reader.drained.wait(), 5)  # consumed; it now waits for more
    assert not task.done()
    reader.feed_data(b"\r\nMAIL FROM:<evil@example>\r\n.\r\n")
    reader.feed_eof()
    assert await task
    assert (receiver.blocks, receiver.problem) == ([], LINE_TOO_LONG)
    assert await reader.read() == b""  # all of it was data, up to the real end


async def test_998_octet_lines_are_fine_even_dot_stuffed(relay: Relay) -> None:
    client = await relay.client()
    body = b"Subject: x\r\n\r\n" + b"a" * 998 + b"\r\n"
    stuffed = b"Subject: x\r\n\r\n." + b"." * 998 + b"\r\n"
    assert (await client.transaction("a@b.example", ["a@verrotech.org"], body)).code == 250
    assert (await client.transaction("a@b.example", ["a@verrotech.org"], stuffed)).code == 250
    assert relay.queue.raw("01TEST0002").endswith(b"\r\n\r\n" + b"." * 998 + b"\r\n")  # type: ignore[union-attr]
    await client.close()


# -- hops ----------------------------------------------------------------------------


def with_received(count: int, body_received: int = 0) -> bytes:
    hops = b"".join(b"Received: from h%d.example by h%d.example; " % (i, i + 1)
                    + DATE.encode() + b"\r\n" for i in range(count))
    tail = b"received: not a header, we are in the body\r\n" * body_received
    return hops + b"Subject: loop?\r\n\r\nbody\r\n" + tail


async def test_fifty_hops_are_fine_fifty_one_are_a_loop(relay: Relay) -> None:
    client = await relay.client()
    assert (await client.transaction("a@b.example", ["a@verrotech.org"],
                                     with_received(50, body_received=60))).code == 250
    assert (await client.transaction("a@b.example", ["a@verrotech.org"],
                                     with_received(51))).last == "554 5.4.6 Too many hops"
    folded = with_received(50).replace(b"Subject", b"RECEIVED  :\r\n\tfrom folded\r\nSubject")
    assert (await client.transaction("a@b.example", ["a@verrotech.org"],
                                     folded)).last == "554 5.4.6 Too many hops"
    assert [r.id for r in relay.rows()] == ["01TEST0001"]
    await client.close()


# -- 8-bit and SMTPUTF8 ------------------------------------------------------------------


async def test_eight_bit_flags(relay: Relay) -> None:
    client = await relay.client()
    latin = "Subject: café\r\n\r\nGrüße\r\n".encode()
    assert (await client.transaction("a@b.example", ["a@verrotech.org"], latin)).code == 250
    assert (await client.transaction("a@b.example", ["a@verrotech.org"], BODY,
                                     " BODY=8BITMIME")).code == 250
    assert (await client.transaction("a@b.example", ["a@verrotech.org"], BODY,
                                     " BODY=7BIT")).code == 250
    assert [(r.eightbit, r.smtputf8) for r in relay.rows()] == [
        (True, False), (True, False), (False, False)]
    assert relay.queue.raw("01TEST0001").endswith(latin)  # type: ignore[union-attr]
    await client.close()


async def test_non_ascii_addresses_need_smtputf8(relay: Relay) -> None:
    client = await relay.client()
    assert (await client.cmd("MAIL FROM:<jöran@sender.example>")).last == (
        "553 5.6.7 Error: non-ASCII address without SMTPUTF8")
    assert (await client.cmd("MAIL FROM:<a@sender.example>")).code == 250
    assert (await client.cmd("RCPT TO:<jöran@verrotech.org>")).last == (
        "553 5.6.7 Error: non-ASCII address without SMTPUTF8")
    assert (await client.cmd(b"RCPT TO:<j\xffran@verrotech.org>")).last == (
        "501 5.1.3 Bad recipient address syntax")
    await client.cmd("RSET")
    reply = await client.transaction("jöran@sender.example", ["jöran@verrotech.org"], BODY,
                                     " SMTPUTF8")
    assert reply.code == 250
    [row] = relay.rows()
    assert (row.sender, row.smtputf8) == ("jöran@sender.example", True)
    assert relay.recipients_of(row.id) == ["jöran@verrotech.org"]
    assert relay.queue.raw(row.id).startswith(  # type: ignore[union-attr]
        received_header(row.id, "jöran@verrotech.org").split(b"\r\n\tfor")[0])
    assert "for <jöran@verrotech.org>;".encode() in relay.queue.raw(row.id)  # type: ignore[operator]
    await client.close()


# -- STARTTLS ------------------------------------------------------------------------------


async def test_starttls(start: StartRelay, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    relay = await start(smtp={"tls_cert": "cert.pem", "tls_key": "cert.pem"})
    client = await relay.client(ehlo=None)
    assert (await client.ehlo()).lines[-1] == "STARTTLS"
    assert (await client.cmd("HELP")).last.endswith(" STARTTLS")
    assert (await client.cmd("STARTTLS")).last == "220 2.0.0 Ready to start TLS"
    context = ssl.create_default_context()
    ca.configure_trust(context)
    await client.writer.start_tls(context, server_hostname=HOST)
    assert (await client.cmd("MAIL FROM:<a@b.example>")).code == 503  # EHLO again first
    reply = await client.ehlo()
    assert "STARTTLS" not in reply.lines and "AUTH" not in " ".join(reply.lines)
    assert (await client.cmd("STARTTLS")).last == "503 5.5.1 Error: TLS already active"
    assert (await client.transaction("a@b.example", ["bob@verrotech.com"], BODY)).code == 250
    assert relay.queue.raw("01TEST0001") == received_header(
        "01TEST0001", protocol="ESMTPS") + BODY
    await client.close()


async def test_failed_tls_handshake_ends_only_that_session(start: StartRelay,
                                                          tmp_path: Path) -> None:
    trustme.CA().issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "cert.pem"))
    relay = await start(smtp={"tls_cert": "cert.pem", "tls_key": "cert.pem"})
    client = await relay.client()
    assert (await client.cmd("STARTTLS")).code == 220
    await client.send(b"this is not a TLS client hello\r\n" * 10)
    assert await client.at_eof() == b""
    await client.close()
    assert await relay.listeners.wait_sessions(20)
    assert relay.listeners.sessions_active == 0
    other = await relay.client()
    assert (await other.cmd("NOOP")).code == 250
    await other.close()


# -- connection and rate limits ----------------------------------------------------------------


async def test_connections_per_ip(start: StartRelay) -> None:
    relay = await start(smtp={"max_connections_per_ip": 2})
    first, second = await relay.client(), await relay.client()
    assert relay.listeners.sessions_active == 2
    refused = await Client.connect(relay.address)
    assert (await refused.reply()).last == (
        f"421 4.7.0 {HOST} Error: too many connections from 127.0.0.1")
    assert await refused.at_eof() == b""
    await refused.close()
    await first.cmd("QUIT")
    await first.at_eof()
    await first.close()
    third = await relay.client()  # a slot was freed
    for client in (second, third):
        await client.close()
    assert await relay.listeners.wait_sessions(20)
    assert relay.listeners.stats.rejections["connection_limit"] == 1


async def test_total_connections(start: StartRelay) -> None:
    relay = await start(smtp={"max_connections": 1})
    first = await relay.client()
    refused = await Client.connect(relay.address)
    assert (await refused.reply()).code == 421
    assert await refused.at_eof() == b""
    for client in (first, refused):
        await client.close()


async def test_messages_per_ip_per_minute(start: StartRelay) -> None:
    relay = await start(smtp={"max_messages_per_ip_per_minute": 2})
    client = await relay.client()
    for _ in range(2):
        assert (await client.cmd("MAIL FROM:<a@b.example>")).code == 250
        await client.cmd("RSET")
    assert (await client.cmd("MAIL FROM:<a@b.example>")).last == (
        "450 4.7.1 Error: too much mail from 127.0.0.1")
    relay.clock.advance(61)
    assert (await client.cmd("MAIL FROM:<a@b.example>")).code == 250
    await client.close()


async def test_rate_limit_zero_means_unlimited(start: StartRelay) -> None:
    relay = await start(smtp={"max_messages_per_ip_per_minute": 0})
    client = await relay.client()
    for _ in range(20):
        assert (await client.cmd("MAIL FROM:<a@b.example>")).code == 250
        await client.cmd("RSET")
    await client.close()


async def test_metrics(start: StartRelay) -> None:
    metrics = Metrics()
    relay = await start(smtp={"max_connections_per_ip": 1}, metrics=metrics)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    client = await relay.client()
    assert sample("relay_smtp_sessions_active") == 1
    refused = await Client.connect(relay.address)
    assert (await refused.reply()).code == 421
    await refused.close()
    assert (await client.transaction("a@b.example", ["bob@verrotech.com"], BODY)).code == 250
    await client.cmd("MAIL FROM:<a@b.example>")
    await client.cmd("RCPT TO:<x@other.example>")
    await client.cmd("RCPT TO:<dave@verrotech.com>")
    await client.cmd("QUIT")
    await client.at_eof()
    await client.close()
    assert await relay.listeners.wait_sessions(20)
    assert sample("relay_smtp_messages_accepted_total") == 1
    assert sample("relay_smtp_rejections_total", reason="connection_limit") == 1
    assert sample("relay_smtp_rejections_total", reason="relay_denied") == 1
    assert sample("relay_smtp_rejections_total", reason="unknown_recipient") == 1
    assert sample("relay_smtp_sessions_active") == 0


# -- timeouts ------------------------------------------------------------------------------------


async def test_command_timeout(start: StartRelay) -> None:
    relay = await start(smtp={"command_timeout": 0.2})
    client = await relay.client()
    assert await client.at_eof() == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n".encode()
    await client.close()


async def test_data_timeout_drops_a_stalled_client_and_keeps_nothing(start: StartRelay) -> None:
    relay = await start(smtp={"command_timeout": 60, "data_timeout": 0.2})
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@b.example>")
    await client.cmd("RCPT TO:<a@verrotech.org>")
    await client.cmd("DATA")
    await client.send(BODY)  # and then nothing
    assert await client.at_eof() == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n".encode()
    await client.close()
    assert await relay.listeners.wait_sessions(20)
    assert relay.rows() == []


async def test_data_timeout_is_an_idle_timeout_without_min_data_rate(start: StartRelay) -> None:
    """A slow but steady client outlives both timeouts (aiosmtpd alone would drop it
    command_timeout after DATA); pacing, not synchronisation, is what sleeps do here.
    (With the default min_data_rate, 70 bytes/s would run out: test_slowloris.py.)"""
    relay = await start(smtp={"command_timeout": 0.5, "data_timeout": 0.5, "min_data_rate": 0})
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@b.example>")
    await client.cmd("RCPT TO:<a@verrotech.org>")
    await client.cmd("DATA")
    for i in range(12):  # 1.2 s in all, never 0.5 s without a byte
        await client.send(b"line %d\r\n" % i)
        await asyncio.sleep(0.1)
    await client.send(b".\r\n")
    assert (await client.reply()).code == 250
    await client.close()


async def test_a_busy_session_outlives_its_first_deadline(start: StartRelay) -> None:
    """Each command puts the command timeout ahead again. Pacing, not
    synchronisation, is what sleeps do here."""
    relay = await start(smtp={"command_timeout": 0.5})
    client = await relay.client()
    for _ in range(12):  # 1.2 s in all, never 0.5 s without a command
        assert (await client.cmd("NOOP")).code == 250
        await asyncio.sleep(0.1)
    assert await client.at_eof() == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n".encode()
    await client.close()


async def test_back_from_data_the_shorter_command_timeout_applies(start: StartRelay) -> None:
    """After a message, the session waits for its next command under
    command_timeout, not under the longer data_timeout of the DATA before."""
    relay = await start(smtp={"command_timeout": 0.2, "data_timeout": 600})
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@b.example>")
    await client.cmd("RCPT TO:<a@verrotech.org>")
    await client.cmd("DATA")
    await client.send(BODY + b".\r\n")
    assert (await client.reply()).code == 250
    closing = await asyncio.wait_for(client.at_eof(), 10)
    assert closing == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n".encode()
    await client.close()


# -- ETRN ------------------------------------------------------------------------------------


async def test_etrn_from_an_allowed_client(start: StartRelay) -> None:
    relay = await start(smtp={"etrn_clients": ["127.0.0.0/8"]})
    client = await relay.client()
    assert (await client.cmd("ETRN verrotech.com")).last == (
        "250 2.0.0 Queuing for node verrotech.com started")
    assert (await client.cmd("ETRN @VerroTech.org")).code == 250
    assert relay.etrn_calls == ["verrotech.com", "verrotech.org"]
    assert (await client.cmd("ETRN other.example")).last == (
        "458 4.1.0 Unable to queue messages for node other.example: not a hosted domain")
    assert (await client.cmd("ETRN #queue")).code == 458
    for bad in ("ETRN", "ETRN foo..bar", "ETRN a b", "ETRN [127.0.0.1]"):
        assert (await client.cmd(bad)).last == "501 5.5.4 Syntax: ETRN <domain>"
    await client.cmd("MAIL FROM:<a@b.example>")
    assert (await client.cmd("ETRN verrotech.com")).code == 503
    assert relay.etrn_calls == ["verrotech.com", "verrotech.org"]
    await client.close()


async def test_etrn_refused_for_other_clients(start: StartRelay) -> None:
    relay = await start(smtp={"etrn_clients": ["10.0.0.0/8", "::1"]})
    client = await relay.client()
    assert (await client.cmd("ETRN verrotech.com")).last == (
        "459 4.7.1 Node verrotech.com not allowed: access denied")
    assert relay.etrn_calls == []
    await client.close()


async def test_etrn_failure_is_458(start: StartRelay) -> None:
    async def broken(domain: str) -> None:
        raise RuntimeError("database gone")

    relay = await start(smtp={"etrn_clients": ["127.0.0.1"]}, on_etrn=broken)
    client = await relay.client()
    assert (await client.cmd("ETRN verrotech.com")).last == (
        "458 4.3.0 Unable to queue messages for node verrotech.com")
    await client.close()


# -- shutdown -----------------------------------------------------------------------------------


async def test_close_lets_a_message_in_flight_finish(start: StartRelay) -> None:
    relay = await start()
    idle = await relay.client()
    busy = await relay.client()
    await busy.cmd("MAIL FROM:<a@b.example>")
    await busy.cmd("RCPT TO:<a@verrotech.org>")
    await busy.cmd("DATA")
    await busy.send(BODY)
    address = relay.address
    relay.listeners.close()
    assert await idle.at_eof() == f"421 4.3.2 {HOST} Service shutting down\r\n".encode()
    with pytest.raises(OSError):
        await Client.connect(address)
    await busy.send(b".\r\n")
    assert (await busy.reply()).code == 250
    assert await busy.at_eof() == f"421 4.3.2 {HOST} Service shutting down\r\n".encode()
    await relay.listeners.wait_closed()
    assert [r.id for r in relay.rows()] == ["01TEST0001"]
    for client in (idle, busy):
        await client.close()


async def test_after_the_grace_a_message_still_arriving_is_dropped(start: StartRelay) -> None:
    """stop_receiving(): the session inside DATA hears 421 and nothing of its
    message is kept; the one whose message is being stored still hears 250."""
    storing_started, may_finish = asyncio.Event(), asyncio.Event()
    stored: list[str] = []

    async def slow(message: NewMessage) -> None:
        storing_started.set()
        await may_finish.wait()
        stored.append(message.id)

    relay = await start(submit=slow)
    storing, arriving = await relay.client(), await relay.client()
    for client in (storing, arriving):
        await client.cmd("MAIL FROM:<a@b.example>")
        await client.cmd("RCPT TO:<a@verrotech.org>")
        assert (await client.cmd("DATA")).code == 354
    await arriving.send(b"Subject: slow\r\n\r\nthe first half")
    await storing.send(BODY + b".\r\n")
    await storing_started.wait()
    relay.listeners.close()
    relay.listeners.stop_receiving()
    assert await arriving.at_eof() == f"421 4.3.2 {HOST} Service shutting down\r\n".encode()
    may_finish.set()
    assert (await storing.reply()).code == 250
    assert await storing.at_eof() == f"421 4.3.2 {HOST} Service shutting down\r\n".encode()
    await relay.listeners.wait_closed()
    assert stored == ["01TEST0001"]
    for client in (storing, arriving):
        await client.close()


def test_idle_sessions_hear_421_on_close_under_uvloop(tmp_path: Path) -> None:
    """`relay serve` runs on uvloop, whose transports are no asyncio.WriteTransport."""
    import uvloop

    async def scenario() -> bytes:
        async def submit(message: NewMessage) -> None:
            raise QueueError("not in this test")

        listeners = await start_listeners(make_config(tmp_path), submit, id_factory=Ids(),
                                                clock=FakeClock(T0))
        reader, writer = await asyncio.open_connection(*listeners.addresses[0])
        await reader.readline()  # the greeting
        listeners.close()
        rest = await reader.read()
        writer.close()
        await listeners.wait_closed()
        return rest

    assert uvloop.run(scenario()) == f"421 4.3.2 {HOST} Service shutting down\r\n".encode()


# -- fuzzing RCPT over the wire: never a 250 for anything but a hosted domain ---------------

_SAFE_LOCAL = re.compile(r"[A-Za-z0-9#$&'*+/=?^_`{|}~.-]+")
_HOSTED = {"verrotech.com", "verrotech.org", "files.example"}
_PIECES = st.sampled_from(
    ["bob", "x", "@", "%", "!", '"', ":", ",", ".", "<", ">", "\\", " ", "[", "]", "ö",
     "verrotech.org", "verrotech.com", "other.example", "VERROTECH.ORG", "@verrotech.org",
     "@other.example", "127.0.0.1", "-", "\t", "(", ")"]
)
_ADDRESSES = st.one_of(
    st.lists(_PIECES, max_size=8).map("".join),
    # near misses: something at a hosted domain
    st.tuples(st.lists(_PIECES, min_size=1, max_size=4).map("".join),
              st.sampled_from(["@verrotech.org", "@VerroTech.org.", "@verrotech.com"]))
    .map("".join),
)


@contextlib.contextmanager
def relay_in_thread(config: config_module.Config) -> Iterator[tuple[str, int]]:
    """The relay on its own loop in a thread, for a synchronous (hypothesis) test."""
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    holder: dict[str, Any] = {}

    async def main() -> None:
        async def submit(message: NewMessage) -> None:
            raise QueueError("not in this test")

        listeners = await start_listeners(config, submit, id_factory=Ids(),
                                                clock=FakeClock(T0))
        holder["listeners"], holder["stop"] = listeners, asyncio.Event()
        ready.set()
        await holder["stop"].wait()
        listeners.abort()
        await listeners.wait_closed()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),))
    thread.start()
    try:
        assert ready.wait(20)
        yield holder["listeners"].addresses[0]
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(20)
        loop.close()


def test_fuzz_rcpt_never_relays(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"max_recipients": 1000})
    with relay_in_thread(config) as address, socket.create_connection(address, 20) as sock, \
            sock.makefile("rb") as stream:

        def reply() -> str:
            while True:
                line = stream.readline().decode("utf-8", "replace")
                assert line.endswith("\r\n"), line
                if line[3] != "-":
                    return line[:-2]

        def cmd(line: str) -> str:
            sock.sendall(line.encode() + b"\r\n")
            return reply()

        reply()
        cmd("EHLO fuzz.example")
        assert cmd("MAIL FROM:<a@b.example> SMTPUTF8").startswith("250")

        @settings(max_examples=300, deadline=None)
        @given(address=_ADDRESSES, bracket=st.booleans())
        def check(address: str, bracket: bool) -> None:
            answer = cmd(f"RCPT TO:<{address}>" if bracket else f"RCPT TO:{address}")
            if answer.startswith("2"):
                # Unbracketed, the path is the first word (the rest are parameters).
                path = address if bracket else address.strip().split(" ")[0]
                local, _, domain = path.rpartition("@")
                assert _SAFE_LOCAL.fullmatch(local.replace("ö", "o")), (address, answer)
                assert domain.lower().removesuffix(".") in _HOSTED, (address, answer)
            else:
                assert answer[:1] in "45", answer

        check()


# -- internationalised domains: one domain whatever the spelling ------------------------


@pytest.mark.parametrize("configured", ["bücher.test", "xn--bcher-kva.test"])
async def test_an_idn_domain_is_queued_and_flushed_under_its_a_label(
        start: StartRelay, configured: str) -> None:
    relay = await start(smtp={"etrn_clients": ["127.0.0.0/8"], "etrn_interval": "0s"},
                        domains={configured: {}})
    client = await relay.client()
    await client.cmd("MAIL FROM:<a@sender.example> SMTPUTF8")
    for rcpt in ("uni@bücher.test", "UNI@XN--BCHER-KVA.test", "eva@Bücher.Test."):
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).code == 250, rcpt
    await client.cmd("DATA")
    await client.send(BODY + b".\r\n")
    assert (await client.reply()).code == 250
    [row] = relay.rows()
    assert row.destination == "xn--bcher-kva.test"
    # one mailbox in two spellings is one recipient; the final dot is not passed on
    assert relay.recipients_of(row.id) == ["uni@bücher.test", "eva@Bücher.Test"]
    for node in ("bücher.test", "@XN--BCHER-KVA.TEST"):
        assert (await client.cmd(f"ETRN {node}")).last == (
            f"250 2.0.0 Queuing for node {node} started")
    assert relay.etrn_calls == ["xn--bcher-kva.test", "xn--bcher-kva.test"]
    assert (await client.cmd("ETRN bü_cher.test")).last == "501 5.5.4 Syntax: ETRN <domain>"
    await client.close()


# -- room: the memory shared by messages being received ----------------------------


async def held_reaches(relay: Relay, size: int) -> None:
    """Wait until the sessions together hold at least `size` bytes of DATA."""
    budget = relay.listeners._shared.inflight

    async def reached() -> None:
        while budget.used < size:
            await asyncio.sleep(0)  # one turn of the loop: the sessions read meanwhile

    await asyncio.wait_for(reached(), 10)


async def test_a_message_over_the_shared_data_budget_gets_451_and_others_carry_on(
        start: StartRelay) -> None:
    relay = await start(smtp={"max_inflight_data": "200KB"})
    budget = relay.listeners._shared.inflight
    line = b"x" * 98 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + line * 1500  # 150 KB held while it arrives
    other = b"Subject: other\r\n\r\n" + line * 1000  # 100 KB: would not fit beside it
    first, second = await relay.client(), await relay.client()
    assert (await first.cmd("MAIL FROM:<a@sender.example>")).code == 250
    assert (await first.cmd("RCPT TO:<bob@verrotech.com>")).code == 250
    assert (await first.cmd("DATA")).code == 354
    await first.send(big)
    await held_reaches(relay, len(big) - len(line))

    reply = await second.transaction("c@sender.example", ["bob@verrotech.com"], other)
    assert reply.last == "451 4.3.1 Insufficient system resources"
    assert budget.used < len(big) + len(line)  # what was kept of it is given back
    await first.send(b".\r\n")
    assert (await first.reply()).code == 250  # the first session carried on
    assert budget.used == 0
    small = b"Subject: small\r\n\r\n" + line * 400
    reply = await second.transaction("c@sender.example", ["bob@verrotech.com"], small)
    assert reply.code == 250  # room again once the first was stored
    assert (await second.cmd("NOOP")).code == 250  # the session went on all along
    assert budget.used == 0
    assert [row.sender for row in relay.rows()] == ["a@sender.example", "c@sender.example"]
    assert relay.listeners.stats.rejections["inflight_data"] == 1
    await first.close()
    await second.close()


async def test_a_client_leaving_mid_data_gives_its_bytes_back(start: StartRelay) -> None:
    relay = await start(smtp={"max_inflight_data": "200KB"})
    client = await relay.client()
    assert (await client.cmd("MAIL FROM:<a@sender.example>")).code == 250
    assert (await client.cmd("RCPT TO:<bob@verrotech.com>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(b"Subject: gone\r\n\r\n" + b"y" * 98 + b"\r\n" * 1)
    await held_reaches(relay, 100)
    await client.close()
    await asyncio.wait_for(relay.listeners.wait_sessions(), 10)
    assert relay.listeners._shared.inflight.used == 0


LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()  # held until the test says so
db.execute("ROLLBACK")
"""


async def test_a_queue_locked_past_the_busy_timeout_is_451_then_accepts_again(
        start: StartRelay, tmp_path: Path) -> None:
    """Another process holds the SQLite write lock longer than SQLite waits
    (30 s in service, 0.2 s here): the client hears 451 4.3.0, never 250, and
    once the lock is gone the same session's next message is stored."""
    engine = db.connect(f"sqlite:///{tmp_path}/locked.db")
    db.upgrade(engine)

    @event.listens_for(engine, "connect")
    def _short_wait(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=200")  # after db.connect's 30000

    engine.dispose()  # connections from now on wait 0.2 s
    store = Store(Queue(engine))
    relay = await start(submit=store.put)
    locker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOCKER, str(tmp_path / "locked.db"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert locker.stdin is not None and locker.stdout is not None
    try:
        assert (await locker.stdout.readline()).strip() == b"locked"
        client = await relay.client()
        reply = await client.transaction("a@sender.example", ["bob@verrotech.com"], BODY)
        assert reply.last == "451 4.3.0 Error: queue file write error"
        locker.stdin.write(b"\n")
        await locker.stdin.drain()
        assert await asyncio.wait_for(locker.wait(), 10) == 0
        reply = await client.transaction("a@sender.example", ["bob@verrotech.com"], BODY)
        assert reply.code == 250, reply
        queue_id = reply.last.rsplit(" ", 1)[1]
        await client.close()
    finally:
        if locker.returncode is None:
            locker.kill()
            await locker.wait()
        store.close()
    with engine.connect() as conn:
        assert list(conn.execute(select(messages.c.id)).scalars()) == [queue_id]
    assert relay.listeners.stats.rejections["storage"] == 1
    engine.dispose()
