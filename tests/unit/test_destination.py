"""The destination state machine: every (state, outcome) pair, from one table."""

from datetime import UTC, datetime
from itertools import product

import pytest

from relay.core.destination import Action, AttemptOutcome, State, Transition, transition

Out = AttemptOutcome
UP, DOWN, PROBING = State.UP, State.DOWN, State.PROBING

# (state, outcome) -> (next state, action, backoff step). Written out in full
# on purpose: a new state or outcome fails test_the_table_is_complete until
# someone decides its row.
TABLE: dict[tuple[State, AttemptOutcome], tuple[State, Action, bool]] = {
    (UP, Out.DELIVERED): (UP, Action.NONE, False),
    (UP, Out.DEFERRED): (UP, Action.NONE, False),
    (UP, Out.BOUNCED): (UP, Action.NONE, False),
    (UP, Out.SITE_FAILURE): (DOWN, Action.PARK, True),
    (UP, Out.UNROUTABLE): (UP, Action.NONE, False),
    (UP, Out.EXPIRED): (UP, Action.NONE, False),
    (UP, Out.RETURNED): (UP, Action.NONE, False),
    (UP, Out.PUSHED_BACK): (UP, Action.NONE, False),
    # down, waiting for its retry time: a message claimed before it went down
    # may still reach it (up again), or fail too (same backoff step)
    (DOWN, Out.DELIVERED): (UP, Action.UNPARK, False),
    (DOWN, Out.DEFERRED): (UP, Action.UNPARK, False),
    (DOWN, Out.BOUNCED): (UP, Action.UNPARK, False),
    (DOWN, Out.SITE_FAILURE): (DOWN, Action.PARK, False),
    (DOWN, Out.UNROUTABLE): (DOWN, Action.NONE, False),
    (DOWN, Out.EXPIRED): (DOWN, Action.NONE, False),
    (DOWN, Out.RETURNED): (DOWN, Action.NONE, False),
    (DOWN, Out.PUSHED_BACK): (DOWN, Action.NONE, False),
    # one probe running: its answer decides; without one, probe again
    (PROBING, Out.DELIVERED): (UP, Action.UNPARK, False),
    (PROBING, Out.DEFERRED): (UP, Action.UNPARK, False),
    (PROBING, Out.BOUNCED): (UP, Action.UNPARK, False),
    (PROBING, Out.SITE_FAILURE): (DOWN, Action.PARK, True),
    (PROBING, Out.UNROUTABLE): (DOWN, Action.REPROBE, False),
    (PROBING, Out.EXPIRED): (DOWN, Action.REPROBE, False),
    (PROBING, Out.RETURNED): (DOWN, Action.REPROBE, False),
    (PROBING, Out.PUSHED_BACK): (DOWN, Action.REPROBE, False),
}


def test_the_table_is_complete() -> None:
    assert set(TABLE) == set(product(State, AttemptOutcome))


@pytest.mark.parametrize(("state", "outcome"), sorted(TABLE))
def test_transition(state: State, outcome: AttemptOutcome) -> None:
    after, action, step = TABLE[state, outcome]
    assert transition(state, outcome) == Transition(after, action, backoff_step=step)


@pytest.mark.parametrize("outcome", list(AttemptOutcome))
def test_only_attempts_that_tested_the_hosts_are_informative(outcome: AttemptOutcome) -> None:
    tested = outcome in (Out.DELIVERED, Out.DEFERRED, Out.BOUNCED, Out.SITE_FAILURE)
    assert outcome.informative is tested
    # an uninformative outcome never changes an up or down destination
    if not tested:
        for state in (UP, DOWN):
            assert transition(state, outcome) == Transition(state, Action.NONE)


@pytest.mark.parametrize(
    ("up", "retry_at", "state"),
    [
        (None, None, UP),  # no row
        (True, None, UP),
        (False, datetime(2026, 5, 1, tzinfo=UTC), DOWN),
        (False, None, PROBING),  # start_probes cleared the retry time
    ],
)
def test_state_of_a_stored_row(up: bool | None, retry_at: datetime | None, state: State) -> None:
    assert State.of(up, retry_at) is state
