"""The operator's verbs on the queue: flush, hold, release, delete.

Owns what `relay queue ...` and ETRN change: which messages become due, are
held, released or deleted, by ID, by domain or all. Refuses delivery: a
flushed message is only made due; the scheduler attempts it. Bouncing is
the delivery side's (it needs a DSN) on top of `claim_ids` and `record`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, select, update

from relay.core.address import destination_key
from relay.core.model import MessageState
from relay.queue.rows import Selector
from relay.queue.schema import destinations, messages
from relay.queue.sql import QueueBase, selected


class Commands(QueueBase):
    def flush(self, selector: Selector, now: datetime) -> int:
        """Make waiting messages due now; a flushed domain counts as up again."""
        with self.engine.begin() as conn:
            if selector.everything:
                conn.execute(delete(destinations))
            elif selector.domain:
                conn.execute(
                    delete(destinations).where(
                        destinations.c.name == destination_key(selector.domain)
                    )
                )
            return conn.execute(
                update(messages)
                .where(selected(selector), messages.c.state == MessageState.DEFERRED.value)
                .values(next_attempt_at=now)
            ).rowcount

    def hold(self, selector: Selector) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                update(messages)
                .where(selected(selector), messages.c.state != MessageState.HOLD.value)
                .values(state=MessageState.HOLD.value)
            ).rowcount

    def release(self, selector: Selector, now: datetime) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                update(messages)
                .where(selected(selector), messages.c.state == MessageState.HOLD.value)
                .values(
                    state=MessageState.DEFERRED.value,
                    next_attempt_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount

    def delete(self, selector: Selector) -> int:
        with self.engine.begin() as conn:
            ids = conn.execute(select(messages.c.id).where(selected(selector))).scalars().all()
            self._remove(conn, ids)
            return len(ids)

    def existing(self, ids: Iterable[str]) -> set[str]:
        wanted = list(ids)
        with self._reading() as conn:
            return set(
                conn.execute(select(messages.c.id).where(messages.c.id.in_(wanted))).scalars()
            )
