"""Whole transactions pipelined after the final dot, over a real socket: DATA is
read in bulk, and what follows the dot must still reach the command loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.core.clock import FakeClock
from relay.queue.rows import NewMessage
from relay.smtp.listeners import Listeners, start_listeners
from relay.smtp.policy import Policy
from tests.component.test_smtpd import BODY, T0, Client, Ids, make_config


@pytest.fixture
async def stored(tmp_path: Path) -> AsyncIterator[tuple[Listeners, list[NewMessage]]]:
    config = make_config(tmp_path, {"max_message_size": 2000})
    messages: list[NewMessage] = []

    async def submit(message: NewMessage) -> None:
        messages.append(message)

    listeners = await start_listeners(config, submit, id_factory=Ids(),
                                            clock=FakeClock(T0), policy=Policy(config))
    yield listeners, messages
    listeners.abort()
    await listeners.wait_closed()


def transaction(body: bytes) -> bytes:
    return (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@verrotech.org>\r\nDATA\r\n"
            + body + b".\r\n")


async def test_transactions_sent_in_one_write_each_get_their_replies(
    stored: tuple[Listeners, list[NewMessage]],
) -> None:
    listeners, messages = stored
    client = await Client.connect(listeners.addresses[0])
    assert (await client.reply()).code == 220
    assert (await client.ehlo()).code == 250
    too_big = b"Subject: big\r\n\r\n" + b"y" * 98 + b"\r\n" * 2000
    await client.send(transaction(BODY) + transaction(too_big) + transaction(b"..dot\r\n")
                      + b"QUIT\r\n")
    replies = [(await client.reply()).last for _ in range(13)]
    assert replies == [
        "250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as 01TEST0001",
        "250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
        "552 5.3.4 Message size exceeds fixed limit",
        "250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as 01TEST0002",  # refused ones get no ID
        "221 2.0.0 Bye",
    ]
    assert [m.id for m in messages] == ["01TEST0001", "01TEST0002"]
    assert messages[0].data.endswith(b"\r\n" + BODY)
    assert messages[1].data.endswith(b" +0000\r\n.dot\r\n")  # unstuffed, after our header
    await client.close()
