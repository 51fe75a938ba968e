"""Read-only views of the queue: for the CLI, metrics, health and delivery.

Owns every read that changes nothing: message lists and details, delivery
history, raw bodies, stats and the per-state counts that `queue_counts`
keeps (triggers in schema.py: a few rows however long the queue is, and
every process sharing the database reads the same numbers). Refuses to
write: nothing here opens a write transaction.
"""

from __future__ import annotations

import builtins  # `Views.list` shadows the name in the class body
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import Connection, func, literal, select
from sqlalchemy.exc import SQLAlchemyError

from relay.core.address import destination_key
from relay.core.dsnparams import notify_words
from relay.core.model import MessageState
from relay.queue.rows import DestinationView, MessageView, QueueError, RecipientView, Stats
from relay.queue.schema import (
    bodies,
    delivery_log,
    destinations,
    messages,
    queue_counts,
    recipients,
)
from relay.queue.sql import QueueBase, chunks, one_line


class Views(QueueBase):
    def body(self, body_id: str) -> bytes:
        with self._reading() as conn:
            data = conn.execute(select(bodies.c.data).where(bodies.c.id == body_id)).scalar()
        if data is None:
            raise QueueError(f"body {body_id} is missing")
        return bytes(data)

    def bodies(self, body_ids: Iterable[str]) -> dict[str, bytes]:
        """Several bodies in one read (those that are gone are left out)."""
        wanted = list(set(body_ids))
        if not wanted:
            return {}
        with self._reading() as conn:
            rows = conn.execute(
                select(bodies.c.id, bodies.c.data).where(bodies.c.id.in_(wanted))
            ).all()
        return {row.id: bytes(row.data) for row in rows}

    def list(self, domain: str = "", state: str = "", ids: Sequence[str] = ()) -> list[MessageView]:
        query = select(messages).order_by(messages.c.id)
        if domain:
            query = query.where(messages.c.destination == destination_key(domain))
        if state:
            query = query.where(messages.c.state == state)
        if ids:
            query = query.where(messages.c.id.in_(ids))
        with self._reading() as conn, conn.begin():
            rows = conn.execute(query).all()
            rcpts: dict[str, list[RecipientView]] = {}
            for chunk in chunks([r.id for r in rows]):
                for r in conn.execute(
                    select(recipients)
                    .where(recipients.c.message_id.in_(chunk))
                    .order_by(recipients.c.id)
                ):
                    rcpts.setdefault(r.message_id, []).append(
                        RecipientView(r.address, r.status, r.attempts, r.last_reply,
                                      notify_words(r.notify), r.orcpt)
                    )
            retry = {
                row.name: row.retry_at
                for row in conn.execute(select(destinations.c.name, destinations.c.retry_at))
            }
        return [
            MessageView(
                id=m.id,
                state=m.state,
                sender=m.sender,
                size=m.size,
                received_at=m.received_at,
                next_attempt_at=m.next_attempt_at
                if m.next_attempt_at is not None
                else retry.get(m.destination),
                attempts=m.attempts,
                last_error=m.last_error,
                destination=m.destination,
                client_address=m.client_address,
                recipients=tuple(rcpts.get(m.id, ())),
                node=m.lease_owner if m.state == MessageState.ACTIVE.value else None,
                spf=m.spf,
            )
            for m in rows
        ]

    def show(self, message_id: str) -> MessageView | None:
        found = self.list(ids=[message_id])
        return found[0] if found else None

    def history(self, message_id: str) -> builtins.list[tuple[datetime, str, str, str, str]]:
        with self._reading() as conn:
            return [
                (r.at, r.recipient, r.outcome, r.reply, r.remote_host)
                for r in conn.execute(
                    select(delivery_log)
                    .where(delivery_log.c.message_id == message_id)
                    .order_by(delivery_log.c.id)
                )
            ]

    def raw(self, message_id: str) -> bytes | None:
        with self._reading() as conn:
            data = conn.execute(
                select(bodies.c.data)
                .join(messages, messages.c.body_id == bodies.c.id)
                .where(messages.c.id == message_id)
            ).scalar()
        return None if data is None else bytes(data)

    def stats(self) -> Stats:
        """Counts by state and by domain (non-zero ones only), from `queue_counts`."""
        with self._reading() as conn, conn.begin():
            rows = self._count_rows(conn)
            oldest = conn.execute(select(func.min(messages.c.received_at))).scalar()
        by_state: dict[str, int] = {}
        by_domain: dict[str, int] = {}
        for destination, state, n in rows:
            by_state[state] = by_state.get(state, 0) + n
            by_domain[destination] = by_domain.get(destination, 0) + n
        return Stats(
            sum(by_state.values()),
            {k: v for k, v in by_state.items() if v},
            {k: v for k, v in by_domain.items() if v},
            oldest,
        )

    def destination_rows(self) -> builtins.list[DestinationView]:
        """Every destination with a row: those down, and those found up again
        since (`relay status`); O(destinations)."""
        with self._reading() as conn:
            return [
                DestinationView(row.name, bool(row.up), row.down_since, row.retry_at,
                                int(row.failures), row.last_error)
                for row in conn.execute(select(destinations).order_by(destinations.c.name))
            ]

    # -- queue depth (metrics, health) ---------------------------------------

    def _count_rows(self, conn: Connection) -> builtins.list[tuple[str, str, int]]:
        """(destination, state, n) summed over shards, n != 0."""
        n = func.sum(queue_counts.c.n)
        query = (
            select(queue_counts.c.destination, queue_counts.c.state, n)
            .group_by(queue_counts.c.destination, queue_counts.c.state)
            .having(n != 0)
        )
        return [(row[0], row[1], int(row[2])) for row in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """Messages per state, every state present (0 when none); O(destinations)."""
        result = {state.value: 0 for state in MessageState}
        n = func.sum(queue_counts.c.n)
        query = select(queue_counts.c.state, n).group_by(queue_counts.c.state)
        try:
            with self._reading() as conn:
                for state, total in conn.execute(query):
                    if total or state in result:
                        result[state] = int(total)
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc
        return result

    def counts_by_destination(self) -> dict[str, dict[str, int]]:
        """{destination: {state: n}} for destinations with messages; every state present."""
        try:
            with self._reading() as conn:
                rows = self._count_rows(conn)
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc
        result: dict[str, dict[str, int]] = {}
        for destination, state, n in rows:
            per = result.setdefault(destination, {s.value: 0 for s in MessageState})
            per[state] = per.get(state, 0) + n
        return {d: per for d, per in result.items() if any(per.values())}

    def oldest_received_at(self) -> datetime | None:
        """When the oldest queued message arrived; min() on an index: O(log n)."""
        try:
            with self._reading() as conn:
                value: datetime | None = conn.execute(
                    select(func.min(messages.c.received_at))
                ).scalar()
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc
        return value

    def ping(self) -> None:
        """Raise QueueError unless the database answers a trivial query."""
        try:
            with self._reading() as conn:
                conn.execute(select(literal(1))).scalar_one()
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc
