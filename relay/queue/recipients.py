"""The `known_recipients` table: learned, imported and forgotten addresses.

Owns every statement on it: upserting what an attempt's replies taught (in
the writer's transaction of that attempt: one statement for a whole group
commit), what a callout at RCPT time taught, `relay recipients import` and
`forget` (one transaction each), and
the reads of the CLI and of the accept side's in-memory copy (everything
changed since a time, with the row count that tells a deletion happened),
and pruning what expired.
Refuses to judge: which replies teach what and when knowledge expires are
`relay.core.recipients`'.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, and_, delete, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from relay.core.recipients import KnownRecipient, KnownState, Learned, Source, recipient_key
from relay.queue.rows import QueueError
from relay.queue.schema import known_recipients
from relay.queue.sql import QueueBase, RawInsert, one_line

_table = known_recipients.c
_COLUMNS = ("key", "address", "domain", "state", "source", "learned_at", "last_seen_at")


class KnownRecipientsTable(QueueBase):
    def _learn(self, conn: Connection, seen: Iterable[tuple[Learned, datetime]]) -> None:
        """Upsert what replies taught, in the caller's transaction. A state
        that changes restarts `learned_at`; the same state only moves
        `last_seen_at` on."""
        rows: dict[str, tuple[Any, ...]] = {}
        for learned, at in seen:
            key = learned.key  # one row per key: an upsert may touch a row once
            rows[key] = (key, learned.address, learned.domain, learned.state.value,
                         learned.source.value, at, at)
        if rows:  # in one order on every node: no deadlock between them
            self._upsert_known(conn, [rows[key] for key in sorted(rows)])

    @functools.cached_property
    def _upsert_known(self) -> RawInsert:
        """The upsert, run on the driver's cursor: it is part of every group
        commit of a drain, where Core's work per statement costs more than
        the database's (see `RawInsert`)."""
        quote = self.engine.dialect.identifier_preparer.quote
        table, key = quote(known_recipients.name), quote("key")
        learned_at = (f"CASE WHEN {table}.state = excluded.state THEN {table}.learned_at "
                      "ELSE excluded.learned_at END")
        return RawInsert(known_recipients, _COLUMNS, self.engine, tail=(
            f" ON CONFLICT ({key}) DO UPDATE SET address = excluded.address, "
            "state = excluded.state, source = excluded.source, "
            f"learned_at = {learned_at}, last_seen_at = excluded.last_seen_at"), exact=True)

    def import_recipients(self, addresses: Sequence[str], now: datetime) -> int:
        """Make these addresses known-valid (source `import`), all or none."""
        try:
            with self._transaction() as conn:
                self._learn(conn, ((Learned(a, KnownState.VALID, Source.IMPORT), now)
                                   for a in addresses))
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc
        return len({recipient_key(a) for a in addresses})

    def learn_recipients(self, learned: Sequence[Learned], now: datetime) -> int:
        """Store what callouts taught (their own source), in one transaction;
        not durable: a verdict lost in a crash is asked again."""
        try:
            with self._transaction(durable=False) as conn:
                self._learn(conn, ((item, now) for item in learned))
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc
        return len({item.key for item in learned})

    def forget_recipients(self, addresses: Sequence[str]) -> list[str]:
        """Forget these addresses (any spelling of each); the keys that were known."""
        keys = sorted({recipient_key(a) for a in addresses})
        try:
            with self._transaction() as conn:
                return list(conn.execute(
                    delete(known_recipients).where(_table.key.in_(keys)).returning(_table.key)
                ).scalars())
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc

    def prune_known(self, cutoffs: Mapping[str, tuple[datetime, datetime]]) -> int:
        """Delete what expired: per domain, (valid, invalid) rows last seen
        before their cutoff. Rows of other domains are kept as they are."""
        if not cutoffs:
            return 0
        expired = or_(*(
            and_(_table.domain == domain,
                 or_(and_(_table.state == KnownState.VALID.value, _table.last_seen_at < valid),
                     and_(_table.state == KnownState.INVALID.value,
                          _table.last_seen_at < invalid)))
            for domain, (valid, invalid) in cutoffs.items()))
        with self._transaction(durable=False) as conn:  # lost in a crash: pruned again
            return conn.execute(delete(known_recipients).where(expired)).rowcount

    def known_recipients(self, domain: str = "", state: str = "") -> list[KnownRecipient]:
        """Stored knowledge, by domain then address (expired rows included)."""
        query = select(known_recipients).order_by(_table.domain, _table.key)
        if domain:
            query = query.where(_table.domain == domain)
        if state:
            query = query.where(_table.state == state)
        with self._reading() as conn:
            return [_known(row) for row in conn.execute(query)]

    def known_changes(self, since: datetime | None) -> tuple[list[KnownRecipient], int]:
        """Rows seen since `since` (all when None) and how many rows there are,
        read in one transaction: a count below the reader's own tells it
        that rows were forgotten."""
        query = select(known_recipients)
        if since is not None:
            query = query.where(_table.last_seen_at >= since)
        with self._reading() as conn, conn.begin():
            rows = [_known(row) for row in conn.execute(query)]
            total = conn.execute(select(func.count()).select_from(known_recipients)).scalar_one()
        return rows, int(total)


def _known(row: Row[Any]) -> KnownRecipient:
    return KnownRecipient(
        address=row.address, key=row.key, domain=row.domain, state=KnownState(row.state),
        source=Source(row.source), learned_at=row.learned_at, last_seen_at=row.last_seen_at,
    )
