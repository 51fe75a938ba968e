"""The store's bridge from the event loop to the writer thread, on a real SQLite file.

`Store.put` hands back a future instead of a coroutine (the SMTP session
shields it without a task around it): it must still be done only once the
message is committed, and a closed store must fail it rather than raise.
"""

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import NewMessage, QueueError
from relay.queue.store import Store


def new(qid: str) -> NewMessage:
    return NewMessage(id=qid, sender="s@sender.example", recipients=("a@verrotech.com",),
                      data=b"Subject: x\r\n\r\nbody\r\n",
                      received_at=datetime(2026, 3, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db", background_checkpoints=True)
    db.upgrade(engine)
    store = Store(Queue(engine))
    yield store
    store.close()
    engine.dispose()


async def test_put_is_done_only_once_the_message_is_committed(store: Store) -> None:
    stored = store.put(new("01AAA"))
    assert isinstance(stored, asyncio.Future)
    await stored
    # another connection, not the writer's: the commit is visible to all
    other = Queue(db.connect(str(store.queue.engine.url)))
    try:
        view = other.show("01AAA")
        assert view is not None and view.sender == "s@sender.example"
    finally:
        other.engine.dispose()


async def test_a_shielded_put_commits_even_when_its_waiter_is_cancelled(store: Store) -> None:
    """What the SMTP session relies on when a client hangs up mid-commit."""
    stored = store.put(new("01BBB"))
    waiter = asyncio.shield(stored)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await stored
    assert store.queue.show("01BBB") is not None


async def test_a_closed_store_fails_the_put_instead_of_raising(store: Store) -> None:
    store.close()
    stored = store.put(new("01CCC"))
    with pytest.raises(QueueError, match="queue is closed"):
        await stored
