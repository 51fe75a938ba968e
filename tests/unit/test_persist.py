"""`until_stored`: a write the scheduler must not lose, tried again while the database is away."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from relay.delivery.persist import until_stored
from relay.queue.rows import QueueError


class Database:
    """A write that fails `down` times, then answers."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.calls = 0

    async def write(self) -> str:
        self.calls += 1
        if self.calls <= self.down:
            raise QueueError("connection refused\nsecond line")
        return "stored"


async def test_a_write_is_tried_again_until_the_database_answers(
        caplog: pytest.LogCaptureFixture) -> None:
    database = Database(down=3)
    with caplog.at_level(logging.INFO):
        result = await until_stored(database.write, "Q1: delivery attempt", asyncio.Event(),
                                    3600.0, first_pause=0.0)
    assert result == "stored" and database.calls == 4
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [  # one line when it starts failing, one when it recovers
        "Q1: delivery attempt: not stored, will try again while the database is away: "
        "connection refused",
        "Q1: delivery attempt: stored, the database answers again",
    ]


async def test_a_stop_ends_the_retries(caplog: pytest.LogCaptureFixture) -> None:
    halt = asyncio.Event()
    database = Database(down=10**6)
    task = asyncio.create_task(until_stored(database.write, "Q2: claim given back", halt,
                                            3600.0, first_pause=60.0))
    while database.calls == 0:
        await asyncio.sleep(0)
    halt.set()  # not 60 s: the stop wakes the pause
    assert await asyncio.wait_for(task, 5) is None
    assert database.calls == 2  # a last try when woken, then no more
    assert "given up (stopping)" in caplog.text


async def test_it_gives_up_once_the_lease_is_over(caplog: pytest.LogCaptureFixture) -> None:
    ticks = itertools.count(0.0, 1000.0)  # each look at the clock: 1000 s later
    database = Database(down=10**6)
    result = await until_stored(database.write, "Q3: delivery attempt", asyncio.Event(),
                                3600.0, first_pause=0.0, now=lambda: next(ticks))
    assert result is None
    assert database.calls == 3  # at 0, 2000 and 4000 s; at 5000 s the 3600 s lease is over
    assert "given up (lease over)" in caplog.text


async def test_a_cancelled_write_is_not_retried() -> None:
    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await until_stored(cancelled, "Q4", asyncio.Event(), 3600.0, first_pause=0.0)
