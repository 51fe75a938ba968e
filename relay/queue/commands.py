"""The operator's verbs on the queue: flush, hold, release, delete, requeue.

Owns what `relay queue ...` and ETRN change: which messages become due, are
held, released, deleted or routed afresh, by ID, by domain or all. Each verb
returns the IDs it changed (the mail log names them). Refuses delivery: a
flushed message is only made due; the scheduler attempts it. Bouncing is
the delivery side's (it needs a DSN) on top of `claim_ids` and `record`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Connection, delete, select, update

from relay.core.address import destination_key
from relay.core.model import MessageState
from relay.queue.rows import Selector
from relay.queue.schema import destinations, messages, recipients
from relay.queue.sql import PENDING, QueueBase, chunks, selected


class Commands(QueueBase):
    def flush(self, selector: Selector, now: datetime) -> list[str]:
        """Make waiting messages due now; a flushed domain counts as up again."""
        with self.engine.begin() as conn:
            self._forget_destinations(conn, selector)
            return _ids(conn.execute(
                update(messages)
                .where(selected(selector), messages.c.state == MessageState.DEFERRED.value)
                .values(next_attempt_at=now)
                .returning(messages.c.id)
            ).scalars())

    def hold(self, selector: Selector) -> list[str]:
        with self.engine.begin() as conn:
            return _ids(conn.execute(
                update(messages)
                .where(selected(selector), messages.c.state != MessageState.HOLD.value)
                .values(state=MessageState.HOLD.value)
                .returning(messages.c.id)
            ).scalars())

    def release(self, selector: Selector, now: datetime) -> list[str]:
        with self.engine.begin() as conn:
            return _ids(conn.execute(
                update(messages)
                .where(selected(selector), messages.c.state == MessageState.HOLD.value)
                .values(
                    state=MessageState.DEFERRED.value,
                    next_attempt_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                .returning(messages.c.id)
            ).scalars())

    def delete(self, selector: Selector) -> list[str]:
        with self.engine.begin() as conn:
            ids = _ids(conn.execute(select(messages.c.id).where(selected(selector))).scalars())
            self._remove(conn, ids)
            return ids

    def requeue(self, selector: Selector, now: datetime) -> list[str]:
        """Route afresh, due now (Postfix `postsuper -r`): attempts and backoff
        start over, the lifetime (`received_at`) stays, a held message stays
        held. A message being delivered is left to its attempt. A requeued
        domain counts as up again, as a flushed one does."""
        with self.engine.begin() as conn:
            self._forget_destinations(conn, selector)
            ids = _ids(conn.execute(
                update(messages)
                .where(selected(selector), messages.c.state != MessageState.ACTIVE.value)
                .values(next_attempt_at=now, attempts=0, last_error="")
                .returning(messages.c.id)
            ).scalars())
            for chunk in chunks(ids):
                conn.execute(
                    update(recipients)
                    .where(recipients.c.message_id.in_(chunk), recipients.c.status.in_(PENDING))
                    .values(attempts=0)
                )
            return ids

    def _forget_destinations(self, conn: Connection, selector: Selector) -> None:
        """What was known of the selected domains' reachability (down, backoff step)."""
        if selector.everything:
            conn.execute(delete(destinations))
        elif selector.domain:
            conn.execute(
                delete(destinations).where(
                    destinations.c.name == destination_key(selector.domain)
                )
            )

    def existing(self, ids: Iterable[str]) -> set[str]:
        wanted = list(ids)
        with self._reading() as conn:
            return set(
                conn.execute(select(messages.c.id).where(messages.c.id.in_(wanted))).scalars()
            )


def _ids(found: Iterable[str]) -> list[str]:
    return sorted(found)
