"""Commit gathering over real loopback SMTP into a real queue (SQLite and PostgreSQL).

A message whose DATA ends while another session is inside a mail
transaction (MAIL FROM given, its message not yet stored) waits (at most
`queue.commit_delay`) for that one, and both are stored by one commit; a
session alone never waits, and a transaction that ends without a message
(RSET, the client gone) is no longer waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import event

from relay.core.clock import FakeClock
from relay.queue.access import Queue
from relay.queue.gather import Gathering
from relay.queue.store import Store
from relay.smtp.listeners import Listeners, start_listeners
from relay.smtp.policy import Policy
from tests.component.test_smtpd import BODY, HOST, T0, Client, Ids, make_config


class WatchedGathering(Gathering):
    """Tells the test when the writer starts waiting for a commit."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.waiting = threading.Event()

    def deadline(self) -> float | None:
        deadline = super().deadline()
        if deadline is not None:
            self.waiting.set()
        return deadline


@contextlib.asynccontextmanager
async def started(tmp_path: Path, queue: Queue, gathering: Gathering,
                  ) -> AsyncIterator[tuple[Store, Listeners]]:
    store = Store(queue, gathering=gathering)
    config = make_config(tmp_path)
    listeners = await start_listeners(
        config, store.put, id_factory=Ids(), clock=FakeClock(T0),
        policy=Policy(config, recheck_interval=0), gathering=store.gathering)
    try:
        yield store, listeners
    finally:
        listeners.abort()
        await listeners.wait_closed()
        await asyncio.to_thread(store.close)


async def in_data(address: tuple[str, int]) -> Client:
    client = await Client.connect(address)
    assert (await client.reply()).last == f"220 {HOST} ESMTP mx-relay"
    assert (await client.ehlo()).code == 250
    assert (await client.cmd("MAIL FROM:<a@sender.example>")).code == 250
    assert (await client.cmd("RCPT TO:<bob@verrotech.com>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(BODY)  # all but the final dot
    return client


async def test_a_commit_waits_for_the_message_still_in_data_and_stores_both(
        tmp_path: Path, queue: Queue) -> None:
    gathering = WatchedGathering(delay=30.0)  # ends when the other message comes, not then
    async with started(tmp_path, queue, gathering) as (store, listeners):
        first = await in_data(listeners.addresses[0])
        second = await in_data(listeners.addresses[0])
        commits: list[object] = []
        event.listen(queue.engine, "commit", commits.append)
        await first.send(b".\r\n")
        assert await asyncio.to_thread(gathering.waiting.wait, 20)  # the writer holds it
        await second.send(b".\r\n")
        replies = [await first.reply(), await second.reply()]
        assert [reply.code for reply in replies] == [250, 250]
        assert len(commits) == 1  # one commit carried both
        assert gathering.waits == 1 and gathering.on_the_way == 0
        assert len(await store.read(store.queue.list)) == 2
        for client in (first, second):
            await client.close()


async def test_a_session_alone_never_waits(tmp_path: Path, queue: Queue) -> None:
    gathering = Gathering(delay=30.0)
    async with started(tmp_path, queue, gathering) as (_store, listeners):
        client = await in_data(listeners.addresses[0])
        await client.send(b".\r\n")
        reply = await asyncio.wait_for(client.reply(), 10)  # far less than the delay
        assert reply.code == 250
        assert gathering.waits == 0 and gathering.on_the_way == 0
        await client.close()


async def test_a_refused_message_is_no_longer_waited_for(tmp_path: Path, queue: Queue) -> None:
    gathering = Gathering(delay=30.0)
    async with started(tmp_path, queue, gathering) as (_store, listeners):
        client = await in_data(listeners.addresses[0])
        await client.send(b"bare\nLF\r\n.\r\n")
        assert (await client.reply()).code == 550
        assert gathering.on_the_way == 0
        await client.close()


async def test_a_reload_sets_the_delay_the_writer_reads(tmp_path: Path, queue: Queue) -> None:
    gathering = Gathering(delay=0.001)
    async with started(tmp_path, queue, gathering) as (_store, listeners):
        config = make_config(tmp_path)
        config = config.model_copy(update={
            "queue": config.queue.model_copy(update={"commit_delay": 0.0005})})
        listeners.reconfigure(config, Policy(config, recheck_interval=0), None)
        assert gathering.delay == 0.0005


async def test_a_transaction_that_ends_without_a_message_is_no_longer_waited_for(
        tmp_path: Path, queue: Queue) -> None:
    gathering = Gathering(delay=30.0)
    async with started(tmp_path, queue, gathering) as (_store, listeners):
        address = listeners.addresses[0]
        reset, gone = await Client.connect(address), await Client.connect(address)
        for client in (reset, gone):
            assert (await client.reply()).code == 220
            assert (await client.ehlo()).code == 250
            assert (await client.cmd("MAIL FROM:<a@sender.example>")).code == 250
        assert gathering.on_the_way == 2
        assert (await reset.cmd("RSET")).code == 250
        assert gathering.on_the_way == 1
        assert (await gone.cmd("QUIT")).code == 221
        await gone.at_eof()
        assert (await reset.cmd("NOOP")).code == 250  # a loop turn or more since
        assert gathering.on_the_way == 0
        alone = await in_data(address)  # nobody else in a transaction: no wait
        await alone.send(b".\r\n")
        assert (await asyncio.wait_for(alone.reply(), 10)).code == 250
        assert gathering.waits == 0 and gathering.on_the_way == 0
        for client in (reset, gone, alone):
            await client.close()
