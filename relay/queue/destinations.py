"""The `destinations` table: each destination's state machine, applied.

Owns the rows of destinations found down and the parking of their mail:
an attempt's outcome goes through `relay.core.destination.transition` and
the answer (park, unpark, probe again) is written here, in the caller's
transaction; probes are started when a destination's retry time comes. A
destination going down or coming back is put in the mail log once, by the
transaction that made the transition, after it commits (so once for every
node sharing the queue, never for a rolled-back one). Refuses to decide
anything itself: states and edges are the core module's, retry times the
caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Connection, and_, delete, exists, insert, or_, select, update

from relay.core import maillog
from relay.core.destination import Action, AttemptOutcome, State, transition
from relay.core.model import MessageState
from relay.queue.rows import DestinationUpdate
from relay.queue.schema import destinations, messages
from relay.queue.sql import QueueBase


def _stored(state: State) -> ColumnElement[bool] | None:
    """The rows of `destinations` in `state` (None for UP: it may have no row)."""
    if state is State.DOWN:
        return and_(destinations.c.up.is_(False), destinations.c.retry_at.is_not(None))
    if state is State.PROBING:
        return and_(destinations.c.up.is_(False), destinations.c.retry_at.is_(None))
    return None


@dataclass(frozen=True, slots=True)
class Change:
    """A destination went down (`reason`) or came back (after `down_for` seconds)."""

    destination: str
    up: bool
    reason: str = ""
    down_for: float | None = None  # None: when it went down is not known


class DestinationTable(QueueBase):
    def _changes(self) -> list[Change]:
        """Transitions made by the transaction in progress, logged once it commits.
        Written by the thread that writes (the writer thread): no lock."""
        changes: list[Change] = self.__dict__.setdefault("_destination_changes", [])
        return changes

    def _announce_changes(self) -> None:
        """The transaction committed: its transitions go to the mail log."""
        changes = self._changes()
        done, changes[:] = list(changes), []
        for change in done:
            if change.up:
                maillog.destination_up(change.destination, change.down_for)
            else:
                maillog.destination_down(change.destination, change.reason)

    def _forget_changes(self, keep: int = 0) -> None:
        """The transaction (or a savepoint) rolled back: its transitions never happened."""
        del self._changes()[keep:]

    def _set_destination(self, conn: Connection, dest: DestinationUpdate, now: datetime) -> None:
        """Apply an attempt that tested the destination's hosts (reached them or not)."""
        prior = conn.execute(
            select(
                destinations.c.up, destinations.c.failures, destinations.c.retry_at,
                destinations.c.down_since,
            ).where(destinations.c.name == dest.name)
        ).first()
        state = State.of(None, None) if prior is None else State.of(prior.up, prior.retry_at)
        step = transition(state, dest.outcome)
        if step.action is Action.NONE:
            return  # the common case (up and still up): nothing written
        if step.action is Action.UNPARK:
            conn.execute(
                update(destinations)
                .where(destinations.c.name == dest.name)
                .values(up=True, failures=0, retry_at=None, last_error="", updated_at=now,
                        down_since=None)
            )
            self._unpark(conn, dest.name, now)
            since = prior.down_since if prior is not None else None
            self._changes().append(Change(
                dest.name, up=True,
                down_for=None if since is None else (now - since).total_seconds()))
            return
        if step.action is Action.REPROBE:
            self._no_word(conn, dest.name, dest.outcome, now)
            return
        values: dict[str, object] = {"last_error": dest.error, "updated_at": now}
        if step.backoff_step:
            values |= {
                "up": False,
                "failures": (prior.failures if prior else 0) + 1,
                "retry_at": dest.retry_at,
            }
        if state is State.UP and step.state is not State.UP:
            values["down_since"] = now
            self._changes().append(Change(dest.name, up=False, reason=dest.error))
        if prior is None:
            conn.execute(insert(destinations).values(name=dest.name, **values))
        else:
            conn.execute(
                update(destinations).where(destinations.c.name == dest.name).values(**values)
            )
        conn.execute(  # the whole destination now waits for one probe
            update(messages)
            .where(
                messages.c.destination == dest.name,
                messages.c.state == MessageState.DEFERRED.value,
                messages.c.next_attempt_at.is_not(None),
            )
            .values(next_attempt_at=None)
        )

    def _no_word(
        self, conn: Connection, destination: str, outcome: AttemptOutcome, now: datetime
    ) -> None:
        """An attempt that did not test the hosts (expired, returned): the
        machine only ever asks to probe again, which one UPDATE does without
        reading the row first: its WHERE clause is the states that ask it."""
        states = [s for s in State if transition(s, outcome).action is Action.REPROBE]
        where = [c for c in map(_stored, states) if c is not None]
        if not where:
            return
        conn.execute(
            update(destinations)
            .where(destinations.c.name == destination, or_(*where))
            .values(retry_at=now)
        )

    def _unpark(self, conn: Connection, destination: str, now: datetime) -> int:
        return conn.execute(
            update(messages)
            .where(
                messages.c.destination == destination,
                messages.c.state == MessageState.DEFERRED.value,
                messages.c.next_attempt_at.is_(None),
            )
            .values(next_attempt_at=now)
        ).rowcount

    def failures(self, destination: str) -> int:
        with self._reading() as conn:
            value = conn.execute(
                select(destinations.c.failures).where(destinations.c.name == destination)
            ).scalar()
        return int(value or 0)

    def start_probes(self, now: datetime, stale_before: datetime) -> list[str]:
        """Make one parked message due for each down destination whose retry time came.

        The destination's retry time is cleared while its probe runs (it is
        PROBING), so it is probed once, by one node of all that share the
        queue; a probe lost to a crash is retried after `stale_before`.
        """
        probed = []
        query = select(destinations.c.name).where(
            destinations.c.up.is_(False),
            or_(
                destinations.c.retry_at <= now,
                and_(
                    destinations.c.retry_at.is_(None),
                    destinations.c.updated_at <= stale_before,
                ),
            ),
        )
        if self._postgres:
            # Nodes sharing the queue: the one that locks a destination's row
            # starts its probe; the others skip it and, once that commits, no
            # longer find it due. SQLite's BEGIN IMMEDIATE serialises this anyway.
            query = query.with_for_update(skip_locked=True)
        with self.engine.begin() as conn:
            due = conn.execute(query).scalars().all()
            for name in due:
                probe = conn.execute(
                    select(messages.c.id)
                    .where(
                        messages.c.destination == name,
                        messages.c.state == MessageState.DEFERRED.value,
                        messages.c.next_attempt_at.is_(None),
                    )
                    .order_by(messages.c.id)
                    .limit(1)
                ).scalar()
                if probe is None:
                    waiting = conn.execute(
                        select(
                            exists().where(
                                messages.c.destination == name,
                                messages.c.state != MessageState.HOLD.value,
                            )
                        )
                    ).scalar()
                    if not waiting:  # nothing waits on it: forget it was down
                        conn.execute(delete(destinations).where(destinations.c.name == name))
                        continue
                else:
                    conn.execute(
                        update(messages).where(messages.c.id == probe).values(next_attempt_at=now)
                    )
                conn.execute(
                    update(destinations)
                    .where(destinations.c.name == name)
                    .values(retry_at=None, updated_at=now)
                )
                probed.append(name)
        return probed

    def down_destinations(self) -> dict[str, datetime | None]:
        with self._reading() as conn:
            return {
                row.name: row.retry_at
                for row in conn.execute(
                    select(destinations.c.name, destinations.c.retry_at).where(
                        destinations.c.up.is_(False)
                    )
                )
            }
