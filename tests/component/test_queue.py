"""The queue against real databases: put, claim, record, operator verbs.

Every test runs on SQLite and on PostgreSQL (the session's private server
from tests/support/postgres.py, a fresh database per test).
"""

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Table, event, func, select

from relay.core.destination import AttemptOutcome
from relay.core.model import MessageState, Outcome, RecipientStatus
from relay.queue import db, sql
from relay.queue.access import Queue
from relay.queue.rows import (
    Attempt,
    Claimed,
    DestinationUpdate,
    NewMessage,
    QueueError,
    RecipientUpdate,
    Recorded,
    Selector,
)
from relay.queue.schema import bodies, delivery_log, messages
from tests.support.postgres import needs_postgres

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STORED = Recorded.STORED


def new(qid: str, *rcpts: str, sender: str = "s@sender.example", at: datetime = T0) -> NewMessage:
    return NewMessage(id=qid, sender=sender, recipients=rcpts or ("a@verrotech.com",),
                      data=b"Subject: x\r\n\r\nbody " + qid.encode() + b"\r\n", received_at=at)


def count(queue: Queue, table: Table) -> int:
    with queue.engine.connect() as conn:
        n: int = conn.execute(select(func.count()).select_from(table)).scalar_one()
    return n


def test_put_then_claim_returns_envelope_and_body(queue: Queue) -> None:
    queue.put_many([new("01A", "a@verrotech.com", "b@verrotech.com")])
    [claimed] = queue.claim_due("node", T0, limit=10, lease=600)
    assert claimed.id == "01A"
    assert [r.address for r in claimed.recipients] == ["a@verrotech.com", "b@verrotech.com"]
    assert queue.body(claimed.body_id) == b"Subject: x\r\n\r\nbody 01A\r\n"
    assert queue.show("01A").state == MessageState.ACTIVE  # type: ignore[union-attr]
    assert queue.claim_due("other", T0, limit=10, lease=600) == []


def test_multi_domain_message_splits_per_destination_sharing_one_body(queue: Queue) -> None:
    queue.put_many([new("01B", "a@verrotech.com", "b@other.example", "c@verrotech.com")])
    views = {v.id: v for v in queue.list()}
    assert set(views) == {"01B", "01B.2"}
    assert views["01B"].destination == "verrotech.com"
    assert [r.address for r in views["01B"].recipients] == ["a@verrotech.com", "c@verrotech.com"]
    assert count(queue, bodies) == 1
    queue.delete(Selector(ids=("01B",)))
    assert count(queue, bodies) == 1  # still used by 01B.2
    queue.delete(Selector(ids=("01B.2",)))
    assert count(queue, bodies) == 0


def test_not_due_is_not_claimed_and_order_is_oldest_first(queue: Queue) -> None:
    queue.put_many([new("02", at=T0 + timedelta(seconds=1)), new("01", at=T0),
                    new("03", at=T0 + timedelta(seconds=60))])
    claimed = queue.claim_due("n", T0 + timedelta(seconds=5), limit=10, lease=600)
    assert [c.id for c in claimed] == ["01", "02"]


def claim_one(queue: Queue, now: datetime = T0) -> Claimed:
    [claimed] = queue.claim_due("n", now, limit=1, lease=600)
    return claimed


def test_partial_outcome_keeps_only_pending_recipients(queue: Queue) -> None:
    queue.put_many([new("01", "ok@verrotech.com", "later@verrotech.com", "no@verrotech.com")])
    c = claim_one(queue)
    ok, later, no = c.recipients
    retry = T0 + timedelta(minutes=5)
    assert queue.record(Attempt(
        message_id=c.id, owner="n",
        lease_until=c.lease_until, at=T0, next_attempt_at=retry, last_error="450 busy",
        recipients=(
            RecipientUpdate(ok.id, ok.address, RecipientStatus.DELIVERED, "250 ok",
                            Outcome.DELIVERED),
            RecipientUpdate(later.id, later.address, RecipientStatus.DEFERRED, "450 busy",
                            Outcome.DEFERRED),
            RecipientUpdate(no.id, no.address, RecipientStatus.BOUNCED, "550 no", Outcome.BOUNCED),
        ),
        dsns=(new("DSN1", "s@sender.example", sender=""),),
    )) is Recorded.STORED
    view = queue.show("01")
    assert view is not None
    assert view.state == MessageState.DEFERRED and view.attempts == 1
    assert view.next_attempt_at == retry
    assert {r.address: r.status for r in view.recipients} == {
        "ok@verrotech.com": "delivered", "later@verrotech.com": "deferred",
        "no@verrotech.com": "bounced"}
    assert queue.show("DSN1") is not None
    # retry: only the deferred recipient is claimed
    [c2] = [c for c in queue.claim_due("n", retry, limit=10, lease=600) if c.id == "01"]
    assert [r.address for r in c2.recipients] == ["later@verrotech.com"]
    queue.record(Attempt(message_id=c2.id, owner="n",
                         lease_until=c2.lease_until, at=retry, next_attempt_at=None,
                         recipients=(RecipientUpdate(c2.recipients[0].id, "later@verrotech.com",
                                                     RecipientStatus.DELIVERED, "250 ok",
                                                     Outcome.DELIVERED),)))
    assert queue.show("01") is None  # left the queue; the log remains
    assert [h[1:3] for h in queue.history("01")] == [
        ("ok@verrotech.com", "delivered"), ("later@verrotech.com", "deferred"),
        ("no@verrotech.com", "bounced"), ("later@verrotech.com", "delivered")]


def test_dead_destination_parks_its_mail_and_one_probe_releases_it(queue: Queue) -> None:
    queue.put_many([new(f"0{i}", at=T0 + timedelta(seconds=i)) for i in range(1, 6)])
    c = claim_one(queue, T0 + timedelta(seconds=10))
    retry = T0 + timedelta(minutes=5)
    queue.record(Attempt(
        message_id=c.id, owner="n", lease_until=c.lease_until, at=T0, next_attempt_at=None,
        recipients=(RecipientUpdate(c.recipients[0].id, c.recipients[0].address,
                                    RecipientStatus.DEFERRED, "451 refused", Outcome.DEFERRED),),
        destination=DestinationUpdate("verrotech.com", AttemptOutcome.SITE_FAILURE, retry_at=retry,
                                      error="refused"),
    ))
    later = T0 + timedelta(minutes=1)
    assert queue.claim_due("n", later, limit=10, lease=600) == []  # all parked
    assert queue.down_destinations() == {"verrotech.com": retry}
    # new mail for a down destination is parked on arrival
    queue.put_many([new("09", at=later)])
    assert queue.claim_due("n", later, limit=10, lease=600) == []
    assert queue.start_probes(later, stale_before=T0) == []
    assert queue.start_probes(retry, stale_before=T0) == ["verrotech.com"]
    assert queue.start_probes(retry, stale_before=T0) == []  # one probe per step
    probe = queue.claim_due("n", retry, limit=10, lease=600)
    assert [p.id for p in probe] == ["01"]  # the oldest
    queue.record(Attempt(
        message_id="01", owner="n",
        lease_until=probe[0].lease_until, at=retry, next_attempt_at=None,
        recipients=(RecipientUpdate(probe[0].recipients[0].id, probe[0].recipients[0].address,
                                    RecipientStatus.DELIVERED, "250 ok", Outcome.DELIVERED),),
        destination=DestinationUpdate("verrotech.com", AttemptOutcome.DELIVERED),
    ))
    drained = queue.claim_due("n", retry, limit=10, lease=600)
    assert [d.id for d in drained] == ["02", "03", "04", "05", "09"]  # arrival order


def test_recover_returns_active_mail_to_the_queue(queue: Queue) -> None:
    queue.put_many([new("01")])
    claim_one(queue)
    assert queue.claim_due("n", T0, limit=1, lease=600) == []
    assert queue.recover("n", T0) == 1
    assert [c.id for c in queue.claim_due("n", T0, limit=1, lease=600)] == ["01"]


def test_expired_lease_of_another_node_is_recovered(queue: Queue) -> None:
    queue.put_many([new("01")])
    queue.claim_due("other-node", T0, limit=1, lease=60)
    assert queue.recover("me", T0 + timedelta(seconds=30)) == 0
    assert queue.recover("me", T0 + timedelta(seconds=61)) == 1


def test_hold_release_flush_delete(queue: Queue) -> None:
    queue.put_many([new("01"), new("02", "x@other.example")])
    assert queue.hold(Selector(ids=("01",))) == ["01"]
    assert queue.hold(Selector(ids=("01",))) == []  # idempotent
    assert [c.id for c in queue.claim_due("n", T0, 10, 600)] == ["02"]
    assert len(queue.release(Selector(domain="verrotech.com"), T0)) == 1
    assert len(queue.release(Selector(domain="verrotech.com"), T0)) == 0
    assert len(queue.flush(Selector(everything=True), T0)) == 1  # 02 is active: not touched
    assert queue.delete(Selector(ids=("01", "02"))) == ["01", "02"]
    assert queue.list() == []
    assert count(queue, messages) == 0


def test_record_after_operator_delete_is_harmless(queue: Queue) -> None:
    queue.put_many([new("01")])
    c = claim_one(queue)
    queue.delete(Selector(ids=("01",)))
    assert queue.record(Attempt(
        message_id="01", owner="n", lease_until=c.lease_until, at=T0, next_attempt_at=None,
        recipients=(RecipientUpdate(c.recipients[0].id, c.recipients[0].address,
                                    RecipientStatus.DELIVERED, "250 ok", Outcome.DELIVERED),),
    )) is Recorded.GONE
    assert count(queue, delivery_log) == 0


def test_stats(queue: Queue) -> None:
    queue.put_many([new("01", at=T0), new("02", "x@other.example", at=T0 + timedelta(hours=1))])
    queue.hold(Selector(ids=("02",)))
    stats = queue.stats()
    assert stats.total == 2
    assert stats.by_state == {"deferred": 1, "hold": 1}
    assert stats.by_domain == {"verrotech.com": 1, "other.example": 1}
    assert stats.oldest_received_at == T0


def test_storage_failure_keeps_nothing(queue: Queue) -> None:
    queue.put_many([new("01")])
    from relay.queue.rows import QueueError

    with pytest.raises(QueueError):
        queue.put_many([new("02"), new("01")])  # duplicate id fails the whole batch
    assert [v.id for v in queue.list()] == ["01"]


def delivered(c: Claimed) -> Attempt:
    return Attempt(
        message_id=c.id, owner="n",
        lease_until=c.lease_until, at=T0, next_attempt_at=None, remote_host="mx[127.0.0.2]:25",
        recipients=tuple(RecipientUpdate(r.id, r.address, RecipientStatus.DELIVERED, "250 ok",
                                         Outcome.DELIVERED) for r in c.recipients),
        destination=DestinationUpdate("verrotech.com", AttemptOutcome.DELIVERED),
    )


def test_group_commit_applies_finished_messages_in_bulk(queue: Queue) -> None:
    queue.put_many([new(f"0{i}") for i in range(1, 6)])
    claimed = queue.claim_due("n", T0, limit=10, lease=600)
    assert len(claimed) == 5
    queue.delete(Selector(ids=("05",)))  # an operator removed one while it was in flight
    results = queue.apply([*(delivered(c) for c in claimed), new("06")])
    assert results == [STORED, STORED, STORED, STORED, Recorded.GONE, STORED]
    assert [v.id for v in queue.list()] == ["06"]
    assert count(queue, delivery_log) == 4
    assert count(queue, bodies) == 1
    assert queue.stats().by_state == {"deferred": 1}  # the counts table agrees


def test_group_commit_isolates_a_failing_operation(queue: Queue) -> None:
    queue.put_many([new("01"), new("02"), new("DUP")])
    claimed = queue.claim_due("n", T0, limit=10, lease=600)
    by_id = {c.id: c for c in claimed}
    # a DSN whose queue ID already exists makes its attempt fail, and only that one
    bad = replace(delivered(by_id["02"]), dsns=(new("DUP", sender=""),))
    results = queue.apply([delivered(by_id["01"]), bad])
    assert results[0] is STORED
    assert isinstance(results[1], QueueError)
    assert {v.id for v in queue.list()} == {"02", "DUP"}  # 02 untouched, still leased
    assert count(queue, delivery_log) == 1


def test_group_commit_refuses_only_a_duplicate_put(queue: Queue) -> None:
    queue.put_many([new("01")])
    results = queue.apply([new("02"), replace(new("01"), data=b"other\r\n"), new("03")])
    assert results[0] is STORED and results[2] is STORED
    assert isinstance(results[1], QueueError) and "UNIQUE" in str(results[1]).upper()
    assert [v.id for v in queue.list()] == ["01", "02", "03"]
    assert queue.raw("01") == new("01").data  # the stored one is untouched
    assert queue.stats().by_state == {"deferred": 3}


def test_deleting_more_messages_than_one_statement_takes(queue: Queue) -> None:
    from relay.queue.sql import IDS_PER_STATEMENT

    n = IDS_PER_STATEMENT * 2 + 7
    queue.put_many([new(f"{i:05d}") for i in range(n)])
    assert len(queue.delete(Selector(everything=True))) == n
    assert queue.list() == [] and count(queue, bodies) == 0


def test_a_thread_holding_a_connection_writes_on_it_and_gives_it_back(queue: Queue) -> None:
    """The writer's connection: one checkout for many transactions (on
    PostgreSQL no ping of the pool's before each), returned at the end."""
    checkouts: list[object] = []
    event.listen(queue.engine, "checkout", lambda dbapi, record, proxy: checkouts.append(dbapi))
    with queue.holding_connection():
        for n in range(5):
            assert queue.apply([new(f"H{n}")]) == [STORED]
        [claimed] = queue.claim_due("node", T0, limit=1, lease=60)
    assert len(checkouts) == 1
    assert queue.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert {v.id for v in queue.list()} == {f"H{n}" for n in range(5)}  # committed for all
    assert claimed.id == "H0"


def test_after_a_failed_write_the_held_connection_is_replaced(tmp_path: Path) -> None:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    db.upgrade(engine)
    queue = Queue(engine)
    checkouts: list[object] = []
    event.listen(engine, "checkout", lambda dbapi, record, proxy: checkouts.append(dbapi))
    with queue.holding_connection():
        assert queue.apply([new("F1")]) == [STORED]
        [error] = queue.apply([new("F1")])  # the same queue ID again: refused
        assert isinstance(error, QueueError)
        assert queue.apply([new("F2")]) == [STORED]
    assert len(checkouts) == 2
    assert {v.id for v in queue.list()} == {"F1", "F2"}
    engine.dispose()


@needs_postgres
def test_the_writer_on_postgresql_survives_a_server_dropping_its_connections(
    postgres_db_url: str,
) -> None:
    """As after a server restart: the held connection heard its backend end
    (its FATAL error and EOF, found without a round trip), and the next
    transaction runs on a new one, where the held one would fail."""
    engine, admin = db.connect(postgres_db_url), db.connect(postgres_db_url)
    db.upgrade(engine)
    queue = Queue(engine)
    checkouts: list[object] = []
    event.listen(engine, "checkout", lambda dbapi, record, proxy: checkouts.append(dbapi))
    with queue.holding_connection():
        assert queue.apply([new("P1")]) == [STORED]
        assert queue.apply([new("P2")]) == [STORED]
        assert len(checkouts) == 1
        with admin.connect() as conn:
            ended = conn.exec_driver_sql(  # waits up to 10 s for each backend to be gone
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000))"
                " FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()").scalar()
        assert ended >= 1
        assert queue.apply([new("P3")]) == [STORED]
        assert len(checkouts) == 2
    assert {v.id for v in queue.list()} == {"P1", "P2", "P3"}
    engine.dispose()
    admin.dispose()


@needs_postgres
def test_a_held_postgresql_connection_at_rest_too_long_goes_through_the_pools_ping(
    postgres_db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = db.connect(postgres_db_url)
    db.upgrade(engine)
    queue = Queue(engine)
    checkouts: list[object] = []
    event.listen(engine, "checkout", lambda dbapi, record, proxy: checkouts.append(dbapi))
    monkeypatch.setattr(sql, "IDLE_CHECK", -1.0)  # every rest is too long
    with queue.holding_connection():
        assert queue.apply([new("I1")]) == [STORED]
        assert queue.apply([new("I2")]) == [STORED]
    assert len(checkouts) == 2
    engine.dispose()
