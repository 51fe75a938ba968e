"""Per-connection shortcuts of the accept side: session setup without aiosmtpd's
introspection, and DATA read in bulk, behave as the stock ways do."""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import ssl
import weakref
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from relay.core import config as config_module
from relay.core.clock import FakeClock
from relay.smtp import server as smtpd
from relay.smtp.data import DataReceiver
from relay.smtp.deadline import SessionCap
from relay.smtp.policy import Policy

# -- session setup ---------------------------------------------------------------


class StockRelaySMTP(smtpd.RelaySMTP):
    """RelaySMTP set up by aiosmtpd's own SMTP.__init__, as it used to be."""

    def _init_smtp(self, shared: smtpd.Shared) -> None:
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        settings = shared.settings
        SMTP.__init__(
            self, shared.handler, data_size_limit=settings.max_size, enable_SMTPUTF8=True,
            decode_data=False, hostname=shared.hostname, ident=smtpd.IDENT,
            tls_context=settings.tls_context, timeout=settings.command_timeout,
            auth_exclude_mechanism=("LOGIN", "PLAIN"), loop=shared.loop,
        )
        self._smtp_methods.pop("AUTH", None)


def shared(tmp_path: Path, tls: ssl.SSLContext | None) -> smtpd.Shared:
    config = config_module.from_mapping(
        {"node": {"hostname": "mx.example"}, "smtp": {"listen": ["127.0.0.1:0"]},
         "domains": {"example.org": {}}}, env={}, base=tmp_path)

    async def submit(message: object) -> None:
        return None

    return smtpd.Shared(config, Policy(config), submit, lambda: "ID", FakeClock(), None, tls,
                         asyncio.get_running_loop(), None)


def comparable(value: Any, owner: object) -> Any:
    """`value` with per-instance identities (bound methods, readers, futures) made
    comparable between two sessions."""
    if inspect.ismethod(value):
        return "method", value.__func__, "self" if value.__self__ is owner else value.__self__
    if isinstance(value, collections.defaultdict):
        assert value.default_factory is not None
        return "defaultdict", dict(value), value.default_factory()
    if isinstance(value, dict):
        return {key: comparable(item, owner) for key, item in value.items()}
    if isinstance(value, weakref.ref):
        return "weakref", comparable(value(), owner)
    if isinstance(value, asyncio.StreamReader):
        return "reader", value._limit  # type: ignore[attr-defined]
    if isinstance(value, asyncio.Future):
        return "future", value.done()
    if isinstance(value, collections.deque):
        return "deque", list(value)
    if isinstance(value, SessionCap):  # armed on the loop: compare what it decides
        return "cap", value.expired
    return value


@pytest.mark.parametrize("tls", [False, True])
async def test_session_setup_matches_aiosmtpd(tmp_path: Path, tls: bool) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) if tls else None
    common = shared(tmp_path, context)
    fast, stock = smtpd.RelaySMTP(common), StockRelaySMTP(common)
    assert sorted(vars(fast)) == sorted(vars(stock))
    for name in vars(stock):
        ours, theirs = getattr(fast, name), getattr(stock, name)
        if name == "require_starttls":  # aiosmtpd stores `tls_context and False`
            ours, theirs = bool(ours), bool(theirs)
        assert comparable(ours, fast) == comparable(theirs, stock), name
    assert "AUTH" not in fast._smtp_methods
    assert fast._smtp_methods["DATA"].__func__ is smtpd.RelaySMTP.smtp_DATA
    assert fast.command_size_limits is not stock.command_size_limits


# -- DATA in bulk ----------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def data_session(max_size: int = 10**6) -> SimpleNamespace:
    """Just what RelaySMTP._read_data touches; `loop.time()` counts its calls."""
    ticks = itertools.count(1)
    return SimpleNamespace(
        _reader=asyncio.StreamReader(limit=smtpd.RelaySMTP.line_length_limit),
        loop=SimpleNamespace(time=lambda: float(next(ticks))), transport=FakeTransport(),
        _settings=SimpleNamespace(max_size=max_size, data_timeout=60.0, min_data_rate=0),
        _in_data=False, _deadline=None, _reset_timeout=lambda *args: None,
    )


async def settle() -> None:
    """Let the reading task take all that was fed and wait for more."""
    for _ in range(5):
        await asyncio.sleep(0)


async def read_data(session: SimpleNamespace, pieces: list[bytes]) -> Any:
    """Feed `pieces` one read at a time; the blocks and problem `_read_data`
    left in its receiver, or None if the client went away."""
    read: Callable[..., Any] = smtpd.RelaySMTP._read_data
    receiver = DataReceiver(session._settings.max_size)
    task = asyncio.create_task(read(session, receiver))
    for piece in pieces:
        session._reader.feed_data(piece)
        await settle()
    return (receiver.blocks, receiver.problem) if await task else None


async def rest_of(reader: asyncio.StreamReader) -> bytes:
    reader.feed_eof()
    return await reader.read()


def message(received: Any) -> bytes:
    blocks, problem = received
    assert problem is None
    assert blocks[0] == b""  # room for the Received header
    return b"".join(blocks)


@pytest.mark.parametrize(
    ("pieces", "data"),
    [
        ([b"a\r\n", b".\r\nQUIT\r\n"], b"a\r\n"),
        ([b"a\r\n.", b"\r\nQUIT\r\n"], b"a\r\n"),
        ([b"a\r", b"\n", b".", b"\r", b"\nQUIT\r\n"], b"a\r\n"),
        ([b"a\r\n.", b".\r\n", b".\r\nQUIT\r\n"], b"a\r\n.\r\n"),  # "..": a stuffed "."
        ([b".\r\nQUIT\r\n"], b""),
        ([b".", b"\r\nQUIT\r\n"], b""),
        ([b"Subj", b"ect: x\r", b"\n\r\nbo", b"dy\r\n.\r\nQUIT\r\n"],
         b"Subject: x\r\n\r\nbody\r\n"),
    ],
)
async def test_the_end_and_lines_split_across_reads(pieces: list[bytes], data: bytes) -> None:
    session = data_session()
    assert message(await read_data(session, pieces)) == data
    assert await rest_of(session._reader) == b"QUIT\r\n"
    assert not session._in_data


async def test_pipelined_commands_after_the_dot_stay_in_order() -> None:
    session = data_session()
    after = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
    received = await read_data(session, [b"body\r\n.\r\n" + after])
    assert message(received) == b"body\r\n"
    session._reader.feed_data(b"next\r\n")  # arriving later, it follows
    assert await session._reader.readuntil(b"\r\n") == b"MAIL FROM:<a@b.example>\r\n"
    assert await rest_of(session._reader) == after.partition(b"\r\n")[2] + b"next\r\n"


async def test_a_client_leaving_mid_data_gets_nothing() -> None:
    session = data_session()
    task = asyncio.create_task(read_data(session, [b"Subject: half\r\n\r\nand then"]))
    await settle()
    session._reader.feed_eof()
    assert await task is None
    assert session.transport.closed


@pytest.mark.parametrize(("max_size", "problem"), [(70, None), (69, smtpd.TOO_BIG)])
async def test_the_size_limit_is_inclusive(max_size: int, problem: str | None) -> None:
    body = b"..stuffed\r\n" * 7  # 70 octets once unstuffed
    session = data_session(max_size)
    blocks, found = await read_data(session, [body[:30], body[30:] + b".\r\nQUIT\r\n"])
    assert found == problem
    assert b"".join(blocks) == (b"" if problem else b".stuffed\r\n" * 7)
    assert await rest_of(session._reader) == b"QUIT\r\n"  # drained up to the end either way


async def test_every_read_counts_as_activity_for_the_data_timeout() -> None:
    session = data_session()
    task = asyncio.create_task(read_data(session, []))
    await settle()
    assert session._in_data and session._deadline.at == 1.0 + 60.0
    for tick, piece in enumerate([b"no line end yet", b" still none", b"\r\n"], start=2):
        session._reader.feed_data(piece)
        await settle()
        assert session._deadline.at == float(tick) + 60.0  # without min_data_rate: idle
    session._reader.feed_data(b".\r\n")
    assert message(await task) == b"no line end yet still none\r\n"


# -- replies ----------------------------------------------------------------------


class RecordingTransport(asyncio.Transport):
    """What the session writes, one entry per write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


async def test_a_multi_line_reply_goes_out_in_one_write(tmp_path: Path) -> None:
    session = smtpd.RelaySMTP(shared(tmp_path, None))
    transport = RecordingTransport()
    session.connection_made(transport)
    assert session._reader is not None
    session._reader.feed_data(b"EHLO client.example\r\nNOOP\r\n")
    for _ in range(50):  # until the handler has answered both
        if len(transport.writes) >= 3:
            break
        await asyncio.sleep(0)
    greeting, ehlo, noop = transport.writes[:3]
    assert greeting.startswith(b"220 ")
    lines = ehlo.split(b"\r\n")
    assert lines[0] == b"250-mx.example" and lines[-1] == b""
    assert all(line.startswith(b"250-") for line in lines[:-2])
    assert lines[-2].startswith(b"250 ")  # the last line of the reply, in the same write
    assert noop.startswith(b"250 ")
    transport.close()
    session.connection_lost(None)
