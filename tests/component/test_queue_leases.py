"""Leases checked on record: a claim that expired cannot overwrite a newer one.

Two claims of one message, the first one's record arriving after the
second claim took the message over: on SQLite and PostgreSQL, through the
single-record path (the message stays queued) and the bulk group-commit
path (the message would leave the queue).
"""

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from relay.core.destination import AttemptOutcome
from relay.core.model import MessageState, Outcome, RecipientStatus
from relay.queue.access import Queue
from relay.queue.rows import (
    Attempt,
    Claimed,
    DestinationUpdate,
    NewMessage,
    RecipientUpdate,
    Recorded,
)
from relay.queue.schema import delivery_log, destinations, messages

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 60.0
LATER = T0 + timedelta(seconds=LEASE + 1)  # the first lease has run out


def new(qid: str, sender: str = "s@sender.example") -> NewMessage:
    return NewMessage(id=qid, sender=sender, recipients=("a@verrotech.com",),
                      data=b"Subject: x\r\n\r\nbody\r\n", received_at=T0)


def attempt(c: Claimed, owner: str, status: RecipientStatus, *, dsn: bool = False,
            site_failure: bool = False) -> Attempt:
    outcome = {RecipientStatus.DELIVERED: Outcome.DELIVERED,
               RecipientStatus.DEFERRED: Outcome.DEFERRED,
               RecipientStatus.BOUNCED: Outcome.BOUNCED}[status]
    verdict = AttemptOutcome.SITE_FAILURE if site_failure else AttemptOutcome(outcome.value)
    return Attempt(
        message_id=c.id, owner=owner, lease_until=c.lease_until, at=c.lease_until,
        recipients=tuple(RecipientUpdate(r.id, r.address, status, "reply", outcome)
                         for r in c.recipients),
        next_attempt_at=None if site_failure else c.lease_until + timedelta(minutes=5),
        dsns=(new(f"DSN-{owner}", sender=""),) if dsn else (),
        destination=DestinationUpdate(c.destination, verdict,
                                      retry_at=LATER + timedelta(hours=1), error="refused"),
    )


def taken_over(queue: Queue, first_owner: str, second_owner: str) -> tuple[Claimed, Claimed]:
    """Claimed by `first_owner`, whose lease runs out; then `second_owner` takes it."""
    queue.put_many([new("01")])
    [first] = queue.claim_due(first_owner, T0, limit=1, lease=LEASE)
    assert queue.recover(second_owner, LATER) == 1  # the expired lease is returned
    [second] = queue.claim_due(second_owner, LATER, limit=1, lease=LEASE)
    assert first.id == second.id == "01" and first.lease_until != second.lease_until
    return first, second


def rows(queue: Queue) -> tuple[list[tuple[str, str, str | None]], int, int]:
    """(messages (id, state, lease owner), delivery log rows, destinations rows)."""
    with queue.engine.connect() as conn:
        found = [tuple(r) for r in conn.execute(
            select(messages.c.id, messages.c.state, messages.c.lease_owner)
            .order_by(messages.c.id))]
        logged = conn.execute(select(func.count()).select_from(delivery_log)).scalar_one()
        down = conn.execute(select(func.count()).select_from(destinations)).scalar_one()
    return found, logged, down  # type: ignore[return-value]


Record = Callable[[Queue, Attempt], Recorded]
PATHS: dict[str, Record] = {
    "record": lambda queue, a: queue.record(a),  # one transaction of its own
    "group commit": lambda queue, a: _one(queue.apply([a])),  # the writer's batches
}


def _one(results: list[Recorded | Exception]) -> Recorded:
    [result] = results
    assert isinstance(result, Recorded)
    return result


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("owners", [("n1", "n2"), ("n1", "n1")], ids=["other node", "same node"])
@pytest.mark.parametrize("status", [RecipientStatus.DEFERRED, RecipientStatus.DELIVERED])
def test_a_late_record_of_an_expired_claim_is_refused(
    queue: Queue, path: str, owners: tuple[str, str], status: RecipientStatus,
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = PATHS[path]
    first, second = taken_over(queue, *owners)
    before = rows(queue)
    assert before[0] == [("01", MessageState.ACTIVE.value, owners[1])]

    with caplog.at_level(logging.WARNING, logger="relay.queue"):
        late = record(queue, attempt(first, owners[0], status, dsn=True, site_failure=True))
    assert late is Recorded.STALE
    assert rows(queue) == before  # nothing of it stored: no state, log, DSN or destination
    [warning] = [r for r in caplog.records if r.name == "relay.queue"]
    assert warning.getMessage().startswith("01: attempt record refused")

    assert record(queue, attempt(second, owners[1], status)) is Recorded.STORED
    found, logged, _ = rows(queue)
    assert logged == 1
    if status is RecipientStatus.DELIVERED:
        assert found == []  # the newer claim's delivery took it out of the queue
    else:
        assert found == [("01", MessageState.DEFERRED.value, None)]


def test_one_batch_refuses_the_stale_record_and_keeps_the_others(queue: Queue) -> None:
    first, _ = taken_over(queue, "n1", "n2")
    queue.put_many([new("02")])
    [fresh] = queue.claim_due("n1", LATER, limit=1, lease=LEASE)
    assert fresh.id == "02"
    results = queue.apply([attempt(first, "n1", RecipientStatus.DELIVERED),
                           attempt(fresh, "n1", RecipientStatus.DELIVERED)])
    assert results == [Recorded.STALE, Recorded.STORED]
    found, logged, _ = rows(queue)
    assert found == [("01", MessageState.ACTIVE.value, "n2")] and logged == 1


def test_a_record_after_the_lease_was_given_back_is_refused(queue: Queue) -> None:
    """An operator's release (or unclaim) clears the lease: a record that comes
    after it no longer matches any claim."""
    queue.put_many([new("01")])
    [c] = queue.claim_due("n1", T0, limit=1, lease=LEASE)
    assert queue.unclaim(["01"], "n1", T0) == 1
    assert queue.record(attempt(c, "n1", RecipientStatus.DEFERRED)) is Recorded.STALE
    assert rows(queue)[0] == [("01", MessageState.DEFERRED.value, None)]
