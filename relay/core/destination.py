"""A destination's up/down state machine: pure, one transition function.

Owns the states a destination (a recipient domain) can be in, the complete
set of what one attempt can tell about it, and the one function that says
where each (state, outcome) pair leads and what the queue must do about it.
The queue applies the answer to its rows, the scheduler to its own view of
which destinations are down, metrics export it. Refuses I/O, times and SQL:
the caller supplies backoff times and stores the result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class State(enum.StrEnum):
    """Where a destination stands, as stored in its `destinations` row."""

    UP = "up"  # no row, or up: its mail is attempted when due
    DOWN = "down"  # unreachable: its mail is parked until `retry_at`, then one probe
    PROBING = "probing"  # down, and one parked message is being tried as a probe

    @classmethod
    def of(cls, up: bool | None, retry_at: datetime | None) -> State:
        """The state a `destinations` row stores (`up` None: there is no row).

        While a probe runs the row's retry time is cleared (`start_probes`).
        """
        if up is None or up:
            return cls.UP
        return cls.DOWN if retry_at is not None else cls.PROBING


class AttemptOutcome(enum.StrEnum):
    """The complete set of what one attempt (or its absence) tells about its destination."""

    DELIVERED = "delivered"  # a next hop answered and took every recipient
    DEFERRED = "deferred"  # a next hop answered; some recipient waits (4xx)
    BOUNCED = "bounced"  # a next hop answered and refused some recipient (5xx)
    SITE_FAILURE = "site_failure"  # no next hop could start a transaction (or no route now)
    UNROUTABLE = "unroutable"  # no route for good (null MX, no such domain): hosts untested
    EXPIRED = "expired"  # not attempted: too long in the queue
    RETURNED = "returned"  # not attempted: an operator's bounce, or only a delay notice
    PUSHED_BACK = "pushed_back"  # a next hop asked for fewer sessions; given back unattempted

    @property
    def reached(self) -> bool:
        """A next hop answered: the destination is up, whatever it said."""
        return self in _REACHED

    @property
    def informative(self) -> bool:
        """The attempt tested the destination's hosts (reached them, or could not)."""
        return self in _REACHED or self is AttemptOutcome.SITE_FAILURE


_REACHED = frozenset({AttemptOutcome.DELIVERED, AttemptOutcome.DEFERRED, AttemptOutcome.BOUNCED})


class Action(enum.StrEnum):
    """What the queue does to the destination's mail and row on a transition."""

    NONE = "none"  # nothing to write
    PARK = "park"  # waiting mail waits for one probe; the row records the failure
    UNPARK = "unpark"  # the row is cleared and parked mail is due now
    REPROBE = "reprobe"  # the probe ended without news: probe again on the next pass


@dataclass(frozen=True, slots=True)
class Transition:
    state: State  # the state after the outcome
    action: Action
    backoff_step: bool = False  # PARK: one more failure counted, a new retry time set


def transition(state: State, outcome: AttemptOutcome) -> Transition:
    """Where `outcome` leads a destination in `state`, and what to do about it."""
    if outcome.reached:
        return Transition(State.UP, Action.NONE if state is State.UP else Action.UNPARK)
    if outcome is AttemptOutcome.SITE_FAILURE:
        # Already down with no probe running: several sessions failed at once.
        # That is one backoff step, not several.
        return Transition(State.DOWN, Action.PARK, backoff_step=state is not State.DOWN)
    if state is State.PROBING:
        # The probe went without testing the hosts (it expired, was returned,
        # had no route, or was given back): another message probes next.
        return Transition(State.DOWN, Action.REPROBE)
    return Transition(state, Action.NONE)
