"""Two relays claiming from one queue at once never lease a message twice.

Each claimer is a `Queue` on its own engine (like two relay processes on
one database) looping `claim_due` from its own thread. PostgreSQL claims
with ``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite (two engines on one
file) with ``BEGIN IMMEDIATE``, which makes each claim atomic.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import Claimed, NewMessage
from relay.queue.schema import messages
from tests.support.postgres import needs_postgres

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MESSAGES = 500
BATCH = 7
BACKENDS = ["sqlite", pytest.param("postgresql", marks=needs_postgres)]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty queue database of the backend under test."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/queue.db"
    else:
        url = request.getfixturevalue("postgres_db_url")
    engine = db.connect(url)
    db.upgrade(engine)
    engine.dispose()
    yield url


def due_messages(n: int) -> list[NewMessage]:
    return [
        NewMessage(id=f"M{i:05d}", sender="s@sender.example",
                   recipients=(f"u{i}@d{i % 5}.example",), data=b"Subject: x\r\n\r\nbody\r\n",
                   received_at=T0 + timedelta(microseconds=i))
        for i in range(n)
    ]


def test_two_claimers_never_lease_the_same_message(url: str) -> None:
    queues = [Queue(db.connect(url)), Queue(db.connect(url))]
    try:
        queues[0].put_many(due_messages(MESSAGES))
        now = T0 + timedelta(minutes=1)
        claimed: list[list[Claimed]] = [[], []]
        calls = [0, 0]
        errors: list[BaseException] = []
        start = threading.Barrier(2)
        progress = threading.Condition()
        finished = [False, False]

        def claimer(n: int) -> None:
            other = 1 - n
            try:
                start.wait(10)
                while batch := queues[n].claim_due(f"node{n}", now, limit=BATCH, lease=600):
                    assert len(batch) <= BATCH
                    claimed[n].extend(batch)
                    with progress:  # a relay delivers between claims: the other one gets in
                        calls[n] += 1
                        progress.notify_all()
                        progress.wait_for(
                            lambda: calls[other] >= calls[n] or finished[other], timeout=10)
            except BaseException as exc:
                errors.append(exc)
            finally:
                with progress:
                    finished[n] = True
                    progress.notify_all()

        threads = [threading.Thread(target=claimer, args=(n,)) for n in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(45)
        assert not any(t.is_alive() for t in threads)
        assert errors == []

        ids = [{c.id for c in batch} for batch in claimed]
        assert [len(c) for c in claimed] == [len(i) for i in ids]  # no repeats within one
        assert ids[0] & ids[1] == set()  # nor across the two
        assert ids[0] | ids[1] == {m.id for m in due_messages(MESSAGES)}
        assert all(calls), f"one claimer got everything: {calls} claims; no race happened"

        # the database agrees: each message is leased to the node that got it
        with queues[0].engine.connect() as conn:
            owners = dict(conn.execute(select(messages.c.id, messages.c.lease_owner)).all())
        assert {qid for qid, owner in owners.items() if owner == "node0"} == ids[0]
        assert {qid for qid, owner in owners.items() if owner == "node1"} == ids[1]
        assert queues[1].counts() == {"active": MESSAGES, "deferred": 0, "hold": 0}
        assert queues[1].claim_due("node1", now, limit=BATCH, lease=600) == []
    finally:
        for q in queues:
            q.engine.dispose()
