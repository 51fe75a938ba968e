"""The mail log's destination lines: one per transition, written by the
transaction that made it once it commits (SQLite and PostgreSQL).

`destination D is down: <reason>` when the first site failure takes it down,
nothing for further failures or failed probes, `destination D is up again
after <duration>` when it answers; the time it went down is kept in its row.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from sqlalchemy import select

from relay.core.destination import AttemptOutcome
from relay.queue.access import Queue
from relay.queue.schema import destinations
from tests.component.test_queue_destinations import DEST, RETRY, T0, attempt, down, new, probing


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "relay.mail" and r.getMessage().startswith("destination ")]


def down_since(queue: Queue) -> object:
    with queue.engine.connect() as conn:
        return conn.execute(select(destinations.c.down_since)).scalar()


@pytest.fixture(autouse=True)
def mail_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="relay.mail")


def test_down_is_logged_once_and_not_for_later_failures(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    down(queue)
    assert lines(caplog) == [f"destination {DEST} is down: refused"]
    [record] = [r for r in caplog.records if r.getMessage().startswith("destination ")]
    assert record.mail_event == {  # type: ignore[attr-defined]
        "event": "destination down", "destination": DEST, "reason": "refused",
        "message": f"destination {DEST} is down: refused"}
    assert down_since(queue) == T0
    # The destination's other message fails too (it was claimed before the park).
    queue.start_probes(RETRY, stale_before=T0)
    [probe] = queue.claim_due("n", RETRY, limit=10, lease=600)
    queue.record(attempt(probe, AttemptOutcome.SITE_FAILURE, RETRY,
                         retry_at=RETRY + timedelta(minutes=10)))
    assert lines(caplog) == [f"destination {DEST} is down: refused"]  # still the one line
    assert down_since(queue) == T0  # since the first failure, not the last


def test_up_again_names_how_long_it_was_down(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    probe = probing(queue)
    later = RETRY + timedelta(seconds=7)
    queue.record(attempt(probe, AttemptOutcome.DELIVERED, later))
    assert lines(caplog) == [
        f"destination {DEST} is down: refused",
        f"destination {DEST} is up again after 5m 7s",
    ]
    up = [r for r in caplog.records if r.getMessage().startswith("destination ")][-1]
    assert up.mail_event == {  # type: ignore[attr-defined]
        "event": "destination up", "destination": DEST, "down_seconds": 307,
        "message": f"destination {DEST} is up again after 5m 7s"}
    assert down_since(queue) is None
    # Up and still up: nothing more.
    [c] = queue.claim_due("n", later, limit=1, lease=600)
    queue.record(attempt(c, AttemptOutcome.DELIVERED, later))
    assert len(lines(caplog)) == 2


def test_a_group_commit_of_several_failures_logs_one_line(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    queue.put_many([new("01"), new("02"), new("03")])
    claimed = queue.claim_due("n", T0, limit=3, lease=600)
    results = queue.apply([attempt(c, AttemptOutcome.SITE_FAILURE, T0, retry_at=RETRY)
                           for c in claimed])
    assert all(r.value == "stored" for r in results)  # type: ignore[union-attr]
    assert lines(caplog) == [f"destination {DEST} is down: refused"]


def test_a_batch_that_fails_and_is_applied_again_logs_the_transition_once(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    queue.put_many([new("01"), new("02")])
    first, second = queue.claim_due("n", T0, limit=2, lease=600)
    # The second attempt's notice reuses a queue ID: the batch fails after the
    # first attempt took the destination down, is rolled back, and is applied
    # again one operation per savepoint; only that commit is logged.
    clash = dataclasses.replace(attempt(second, AttemptOutcome.SITE_FAILURE, T0, RETRY),
                                dsns=(new("01"),))
    results = queue.apply([attempt(first, AttemptOutcome.SITE_FAILURE, T0, RETRY), clash])
    assert [type(r).__name__ for r in results] == ["Recorded", "QueueError"]
    assert lines(caplog) == [f"destination {DEST} is down: refused"]

