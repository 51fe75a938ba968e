"""The queue applies the destination state machine to its rows (SQLite and PostgreSQL).

Each action of `relay.core.destination.transition` as the tables show it:
PARK (with and without a backoff step), UNPARK, and REPROBE after a probe
that ended without testing the hosts, through `record` and group commit.
"""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from relay.core.destination import AttemptOutcome, State
from relay.core.model import Outcome, RecipientStatus
from relay.queue.access import Queue
from relay.queue.rows import Attempt, Claimed, DestinationUpdate, NewMessage, RecipientUpdate
from relay.queue.schema import destinations

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RETRY = T0 + timedelta(minutes=5)
DEST = "verrotech.com"


def new(qid: str) -> NewMessage:
    return NewMessage(id=qid, sender="s@sender.example", recipients=(f"a@{DEST}",),
                      data=b"Subject: x\r\n\r\nbody\r\n", received_at=T0)


def attempt(c: Claimed, outcome: AttemptOutcome, at: datetime,
            retry_at: datetime | None = None) -> Attempt:
    status, logged = {
        AttemptOutcome.SITE_FAILURE: (RecipientStatus.DEFERRED, Outcome.DEFERRED),
        AttemptOutcome.DELIVERED: (RecipientStatus.DELIVERED, Outcome.DELIVERED),
        AttemptOutcome.EXPIRED: (RecipientStatus.BOUNCED, Outcome.EXPIRED),
        AttemptOutcome.RETURNED: (RecipientStatus.DEFERRED, Outcome.DEFERRED),
    }[outcome]
    return Attempt(
        message_id=c.id, owner="n", lease_until=c.lease_until, at=at,
        recipients=tuple(RecipientUpdate(r.id, r.address, status, "reply", logged)
                         for r in c.recipients),
        next_attempt_at=None, counted=outcome.informative,
        destination=DestinationUpdate(DEST, outcome, retry_at=retry_at, error="refused"),
    )


def stored(queue: Queue) -> tuple[State, int, datetime | None] | None:
    with queue.engine.connect() as conn:
        row = conn.execute(select(destinations.c.up, destinations.c.failures,
                                  destinations.c.retry_at)).first()
    return None if row is None else (State.of(row.up, row.retry_at), row.failures, row.retry_at)


def down(queue: Queue) -> Claimed:
    """Three messages; the first one's site failure takes the destination down."""
    queue.put_many([new("01"), new("02"), new("03")])
    [c] = queue.claim_due("n", T0, limit=1, lease=600)
    queue.record(attempt(c, AttemptOutcome.SITE_FAILURE, T0, retry_at=RETRY))
    assert stored(queue) == (State.DOWN, 1, RETRY)
    assert queue.claim_due("n", T0, limit=10, lease=600) == []  # PARK: all wait
    return c


def probing(queue: Queue) -> Claimed:
    down(queue)
    assert queue.start_probes(RETRY, stale_before=T0) == [DEST]
    assert stored(queue) == (State.PROBING, 1, None)
    [probe] = queue.claim_due("n", RETRY, limit=10, lease=600)
    return probe


def test_a_second_site_failure_while_down_is_not_another_backoff_step(queue: Queue) -> None:
    queue.put_many([new("01"), new("02")])
    first, second = queue.claim_due("n", T0, limit=2, lease=600)  # two sessions at once
    queue.record(attempt(first, AttemptOutcome.SITE_FAILURE, T0, retry_at=RETRY))
    queue.record(attempt(second, AttemptOutcome.SITE_FAILURE, T0,
                         retry_at=RETRY + timedelta(minutes=5)))
    assert stored(queue) == (State.DOWN, 1, RETRY)


def test_a_failed_probe_is_the_next_backoff_step(queue: Queue) -> None:
    probe = probing(queue)
    later = RETRY + timedelta(minutes=10)
    queue.record(attempt(probe, AttemptOutcome.SITE_FAILURE, RETRY, retry_at=later))
    assert stored(queue) == (State.DOWN, 2, later)


def test_a_probe_that_reaches_the_destination_unparks_its_mail(queue: Queue) -> None:
    probe = probing(queue)
    assert queue.apply([attempt(probe, AttemptOutcome.DELIVERED, RETRY)])
    assert stored(queue) == (State.UP, 0, None)
    assert {c.id for c in queue.claim_due("n", RETRY, limit=10, lease=600)} == {"02", "03"}


@pytest.mark.parametrize("outcome", [AttemptOutcome.EXPIRED, AttemptOutcome.RETURNED])
@pytest.mark.parametrize("path", ["record", "group commit"])
def test_a_probe_without_news_asks_for_another_probe(
    queue: Queue, outcome: AttemptOutcome, path: str
) -> None:
    probe = probing(queue)
    done = attempt(probe, outcome, RETRY)
    if path == "record":
        queue.record(done)
    else:
        queue.apply([done])
    assert stored(queue) == (State.DOWN, 1, RETRY)  # REPROBE: due again at once
    assert queue.start_probes(RETRY, stale_before=T0) == [DEST]
    [again] = queue.claim_due("n", RETRY, limit=10, lease=600)
    assert again.id != probe.id or outcome is AttemptOutcome.RETURNED


def test_news_of_nothing_leaves_a_down_destination_alone(queue: Queue) -> None:
    down(queue)
    [expiring] = queue.claim_expired("n", T0, cutoff=T0, limit=1, lease=600)
    queue.apply([attempt(expiring, AttemptOutcome.EXPIRED, T0)])
    assert stored(queue) == (State.DOWN, 1, RETRY)  # no probe started early
