"""Slowloris clients over real loopback sockets: a command line or DATA
trickled a byte at a time, and a session kept alive by NOOPs, are cut with
`421 4.4.2` while a normal client in parallel gets its message queued.

The slow clients' pacing is their traffic (what makes them slow), not a wait
for the server: every assertion waits for the server's reply or its EOF."""

from __future__ import annotations

import asyncio
import time

from relay.queue.rows import NewMessage
from relay.smtp.listeners import Listeners
from tests.component import test_smtp_hostile as hostile
from tests.component.test_smtp_hostile import Start, greeted
from tests.component.test_smtpd import BODY, HOST, Client

start, stored = hostile.start, hostile.stored  # the fixtures: a relay whose submit keeps a list

TIMEOUT = f"421 4.4.2 {HOST} Error: timeout exceeded\r\n"
FAST = {"command_timeout": "1s", "data_timeout": "1s"}


async def drip(client: Client, data: bytes, pace: float) -> None:
    """Send `data` a byte every `pace` seconds until the server hangs up."""
    for i in range(len(data)):
        if client.reader.at_eof() or client.writer.is_closing():
            return
        try:
            client.writer.write(data[i:i + 1])
            await client.writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(pace)


async def normal_sender(listeners: Listeners) -> str:
    client = await greeted(listeners)
    reply = await client.transaction("a@b.example", ["bob@verrotech.com"], BODY)
    await client.cmd("QUIT")
    await client.close()
    return reply.last


async def cut_after(client: Client, data: bytes, pace: float) -> tuple[bytes, float]:
    """Drip `data`; what the server said before closing, and when (from now)."""
    began = time.monotonic()
    sender = asyncio.create_task(drip(client, data, pace))
    said = await client.at_eof()
    sender.cancel()
    return said, time.monotonic() - began


async def test_a_command_line_trickled_a_byte_at_a_time_is_cut_while_others_mail(
        start: Start, stored: list[NewMessage]) -> None:
    listeners = await start(FAST)
    slow = await Client.connect(listeners.addresses[0])
    assert (await slow.reply()).code == 220
    (said, took), normal = await asyncio.gather(
        cut_after(slow, b"EHLO " + b"x" * 200 + b"\r\n", 0.2), normal_sender(listeners))
    assert said.decode() == TIMEOUT
    assert took < 5  # 1 s of command_timeout, not 200 bytes x 0.2 s
    assert normal.startswith("250 2.0.0 Ok: queued as")
    assert [m.recipients for m in stored] == [("bob@verrotech.com",)]
    await slow.close()


async def test_data_dripped_below_min_data_rate_is_cut_and_nothing_kept(
        start: Start, stored: list[NewMessage]) -> None:
    listeners = await start({**FAST, "min_data_rate": 500})
    slow = await greeted(listeners)
    assert (await slow.cmd("MAIL FROM:<slow@b.example>")).code == 250
    assert (await slow.cmd("RCPT TO:<carol@verrotech.com>")).code == 250
    assert (await slow.cmd("DATA")).code == 354
    # Each byte earns 2 ms against 200 ms spent: the second of data_timeout runs out.
    (said, took), normal = await asyncio.gather(
        cut_after(slow, BODY * 10 + b".\r\n", 0.2), normal_sender(listeners))
    assert said.decode() == TIMEOUT
    assert took < 5
    assert normal.startswith("250 ")
    assert [m.recipients for m in stored] == [("bob@verrotech.com",)]
    await slow.close()


async def test_a_slow_but_steady_sender_above_min_data_rate_is_not_cut(
        start: Start, stored: list[NewMessage]) -> None:
    listeners = await start({**FAST, "min_data_rate": 100})
    client = await greeted(listeners)
    assert (await client.cmd("MAIL FROM:<steady@b.example>")).code == 250
    assert (await client.cmd("RCPT TO:<bob@verrotech.com>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    line = b"x" * 98 + b"\r\n"  # 100 bytes every 0.4 s: 250 bytes/s, 2.4 s in all
    for _ in range(6):
        await client.send(line)
        await asyncio.sleep(0.4)
    await client.send(b".\r\n")
    assert (await client.reply()).code == 250
    assert len(stored) == 1
    await client.close()


async def test_max_session_time_ends_a_noop_drip_but_lets_a_message_finish(
        start: Start, stored: list[NewMessage]) -> None:
    listeners = await start({**FAST, "max_session_time": "1s"})
    noop = await greeted(listeners)
    said, took = await cut_after(noop, b"NOOP\r\n" * 100, 0.02)  # a command every 0.12 s
    assert said.decode().endswith(TIMEOUT)
    assert said.count(b"250 2.0.0 Ok") >= 3
    assert took < 5
    await noop.close()
    # The cap passes while a message is arriving: its reply comes first, then the 421.
    sender = await greeted(listeners)
    assert (await sender.cmd("MAIL FROM:<a@b.example>")).code == 250
    assert (await sender.cmd("RCPT TO:<bob@verrotech.com>")).code == 250
    assert (await sender.cmd("DATA")).code == 354
    for _ in range(5):
        await sender.send(b"x" * 998 + b"\r\n")  # 1 KB every 0.3 s: 1.5 s, past the cap
        await asyncio.sleep(0.3)
    await sender.send(b".\r\n")
    said = await sender.at_eof()
    assert said.decode().startswith("250 2.0.0 Ok: queued as")
    assert said.decode().endswith(TIMEOUT)
    assert len(stored) == 1
    await sender.close()
