"""What is fsync'd at commit: accepted mail always, delivery records not.

The level in force is read back by the database itself at each commit
(SQLite's `PRAGMA synchronous`, PostgreSQL's `synchronous_commit`), on both
backends; and SQLite's WAL is checkpointed by us, never inside a commit.
"""

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from relay.core.model import Outcome, RecipientStatus
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import Attempt, NewMessage, RecipientUpdate, Recorded, Selector
from relay.queue.store import Store
from relay.queue.writer import Checkpointer

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STORED = Recorded.STORED


def new(qid: str) -> NewMessage:
    return NewMessage(id=qid, sender="s@sender.example", recipients=("a@verrotech.com",),
                      data=b"Subject: x\r\n\r\nbody\r\n", received_at=T0)


@pytest.fixture
def levels(queue: Queue) -> Iterator[list[str]]:
    """The durability level of every commit, as the database reports it."""
    seen: list[str] = []
    sqlite = queue.engine.dialect.name == "sqlite"
    if not sqlite:  # the test server runs with synchronous_commit=off: not here
        with queue.engine.connect() as conn:
            name = conn.exec_driver_sql("SELECT current_database()").scalar()
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit TO on')
            conn.commit()
        queue.engine.dispose()

    @event.listens_for(queue.engine, "commit")
    def _on_commit(conn: Any) -> None:
        cursor = conn.connection.dbapi_connection.cursor()
        if sqlite:
            cursor.execute("PRAGMA synchronous")
            seen.append({1: "normal", 2: "full"}[cursor.fetchone()[0]])
        else:
            cursor.execute("SHOW synchronous_commit")
            seen.append({"off": "normal", "on": "full"}[cursor.fetchone()[0]])
        cursor.close()

    yield seen
    event.remove(queue.engine, "commit", _on_commit)


def delivered(queue: Queue, qid: str) -> Attempt:
    [claimed] = [c for c in queue.claim_due("n", T0, limit=10, lease=60) if c.id == qid]
    return Attempt(message_id=qid, owner="n",
                   lease_until=claimed.lease_until, at=T0, next_attempt_at=None, recipients=tuple(
        RecipientUpdate(r.id, r.address, RecipientStatus.DELIVERED, "250 ok", Outcome.DELIVERED)
        for r in claimed.recipients))


def test_accepted_mail_is_durable_and_delivery_records_are_not(
    queue: Queue, levels: list[str]
) -> None:
    assert queue.apply([new("01")]) == [STORED]
    assert levels == ["full"]
    done = delivered(queue, "01")  # the claim: a lease, recovered if lost
    assert levels == ["full", "normal"]
    assert queue.apply([done]) == [STORED]
    assert levels == ["full", "normal", "normal"]
    assert queue.show("01") is None


def test_a_batch_holding_new_mail_is_durable_whatever_else_it_holds(
    queue: Queue, levels: list[str]
) -> None:
    queue.apply([new("01")])
    done = delivered(queue, "01")
    del levels[:]
    assert queue.apply([done, new("02"), new("03")]) == [STORED, STORED, STORED]
    assert levels == ["full"]
    assert queue.apply([new("04")]) == [STORED]  # after a non-durable commit on this connection
    assert levels == ["full", "full"]


def test_levels_hold_on_the_writer_s_connection(queue: Queue, levels: list[str]) -> None:
    with queue.holding_connection():
        queue.apply([new("01")])
        done = delivered(queue, "01")
        assert queue.apply([done]) == [STORED]
        assert queue.apply([new("02")]) == [STORED]
    assert levels == ["full", "normal", "normal", "full"]


def test_operator_verbs_stay_durable(queue: Queue, levels: list[str]) -> None:
    queue.apply([new("01")])
    queue.apply([delivered(queue, "01")])
    queue.apply([new("02")])
    del levels[:]
    assert queue.delete(Selector(ids=("02",))) == ["02"]
    assert levels == ["full"]


def test_wal_is_checkpointed_by_us_not_by_commits(tmp_path: Path) -> None:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db", background_checkpoints=True)
    db.upgrade(engine)
    queue = Queue(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    big = b"x" * 20_000
    for n in range(300):  # about 2,000 WAL pages: SQLite's default would checkpoint twice
        queue.apply([NewMessage(id=f"{n:04d}", sender="", recipients=("a@verrotech.com",),
                                data=big, received_at=T0)])
    wal = tmp_path / "queue.db-wal"
    assert wal.stat().st_size > 1000 * 4096  # nothing copied back yet
    assert db.checkpoint(engine) == 0  # all of it copied, nothing left behind
    queue.apply([new("next")])  # the next writer starts the WAL over
    assert db.checkpoint(engine) == 0
    assert queue.raw("0299") == big
    engine.dispose()


@pytest.mark.parametrize("writer_copies_the_rest", [True, False])
def test_under_steady_writes_the_wal_still_starts_over(
    tmp_path: Path, writer_copies_the_rest: bool
) -> None:
    """A background checkpoint cannot copy what is committed while it runs, and
    SQLite starts the WAL over only at a write that finds every frame copied:
    unless the writer copies the rest between two transactions, the WAL grows
    for as long as mail keeps coming (and each commit extends the file)."""
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db", background_checkpoints=True)
    db.upgrade(engine)
    queue = Queue(engine)
    checkpointer = Checkpointer(queue)  # not started: this test plays both threads
    big = b"x" * 20_000

    def put(n: int) -> None:
        queue.apply([NewMessage(id=f"{n:04d}", sender="", recipients=("a@verrotech.com",),
                                data=big, received_at=T0)])

    for n in range(45):
        put(n)
    # A read transaction pins the WAL at message 44, so the background copy
    # stops there, as if 45-49 were committed while it ran.
    reader = sqlite3.connect(tmp_path / "queue.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM messages").fetchone()
    for n in range(45, 50):
        put(n)
    checkpointer.background_round()
    reader.execute("COMMIT")
    if writer_copies_the_rest:
        checkpointer.after_write()
    put(50)
    _busy, frames, _copied = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    reader.close()
    if writer_copies_the_rest:
        assert frames < 40  # the last message alone: the WAL started over
    else:
        assert frames > 300  # all 51 messages: it did not
    assert queue.raw("0050") == big
    engine.dispose()


def test_the_wal_shrinks_back_after_a_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "WAL_SIZE_LIMIT", 200_000)
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db", background_checkpoints=True)
    db.upgrade(engine)
    queue = Queue(engine)
    queue.apply([NewMessage(id="big", sender="", recipients=("a@verrotech.com",),
                            data=b"x" * 2_000_000, received_at=T0)])
    wal = tmp_path / "queue.db-wal"
    assert wal.stat().st_size > 2_000_000
    db.checkpoint(engine)
    queue.apply([new("next")])  # starts the WAL over, and cuts the file back
    assert wal.stat().st_size <= 200_000
    engine.dispose()


def test_store_checkpoints_in_its_own_thread_and_stops_cleanly(tmp_path: Path) -> None:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db", background_checkpoints=True)
    db.upgrade(engine)
    store = Store(Queue(engine))
    assert store.checkpointing
    store.queue.apply([new("01")])
    store.close()
    assert not store.checkpointing
    assert db.checkpoint(engine) == 0
    engine.dispose()


def test_a_refused_begin_is_a_sqlalchemy_error(tmp_path: Path) -> None:
    """BEGIN goes straight to the driver; its errors still look like Core's."""

    from sqlalchemy.exc import OperationalError

    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    db.upgrade(engine)
    holder = sqlite3.connect(tmp_path / "queue.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        with engine.connect() as conn:
            conn.connection.dbapi_connection.execute("PRAGMA busy_timeout=0")
            with pytest.raises(OperationalError, match="locked"), conn.begin():
                pass
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()


def test_a_store_leaves_checkpoints_to_sqlite_unless_the_engine_left_them_to_it(
    tmp_path: Path,
) -> None:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    db.upgrade(engine)
    store = Store(Queue(engine))
    assert not store.checkpointing
    store.close()
    engine.dispose()
