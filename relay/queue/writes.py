"""The queue's writing side: put, claim, record attempts, give back, recover.

Owns every statement that moves a message through its life: putting
accepted mail (one transaction, many messages: group commit), claiming due
work atomically under a lease, recording an attempt (recipient states,
delivery log, DSNs, destination state and removal in one transaction) and
returning what a stopped or dead scheduler held. Every record checks that
the attempt's claim still holds the message's lease; a stale one is refused
and logged. Refuses policy: callers decide outcomes, times and DSN bytes.
Methods are synchronous and meant to run in the writer thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, delete, func, insert, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from relay.core.destination import AttemptOutcome, State
from relay.core.dsnparams import MailParams, RcptParams, notify_words
from relay.core.model import MessageState, RecipientStatus
from relay.core.recipients import Learned
from relay.queue.destinations import DestinationTable
from relay.queue.nodes import NodeTable, lapsed
from relay.queue.recipients import KnownRecipientsTable
from relay.queue.rows import (
    Attempt,
    Claimed,
    DestinationUpdate,
    NewMessage,
    PendingRecipient,
    QueueError,
    Recorded,
)
from relay.queue.schema import delivery_log, destinations, messages, queue_counts, recipients
from relay.queue.sql import PENDING, Lease, one_line

log = logging.getLogger("relay.queue")

Result = Recorded | QueueError


class Writes(KnownRecipientsTable, DestinationTable, NodeTable):
    # -- accept side -------------------------------------------------------

    def put_many(self, batch: Sequence[NewMessage]) -> None:
        """Store messages in one transaction: one fsync for the whole batch."""
        try:
            with self.engine.begin() as conn:
                self._insert(conn, batch)
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc

    # -- claims ------------------------------------------------------------

    def claim_due(
        self,
        owner: str,
        now: datetime,
        limit: int,
        lease: float,
        exclude_destinations: Iterable[str] = (),
    ) -> list[Claimed]:
        """Lease up to `limit` due messages, oldest due first; atomic across processes.

        Messages another node leased and stopped renewing (it died: its lease
        ran out and its heartbeat stopped) are taken over first, while
        running, not only when a scheduler starts; that node's late records
        are then refused as stale.
        """
        where = [
            messages.c.state == MessageState.DEFERRED.value,
            messages.c.next_attempt_at <= now,
        ]
        excluded = tuple(exclude_destinations)
        if excluded:
            where.append(messages.c.destination.not_in(excluded))
        query = (
            select(messages.c.id)
            .where(*where)
            .order_by(messages.c.next_attempt_at, messages.c.id)
            .limit(limit)
        )
        orphans = select(messages.c.id).where(lapsed(now)).order_by(messages.c.id).limit(limit)
        claimed = self._claim(query, owner, now, lease, orphans=orphans)
        taken = sum(1 for c in claimed if c.taken_over)
        if taken:
            log.warning("took over %d deliveries whose node stopped renewing its lease", taken)
        return claimed

    def claim_expired(
        self, owner: str, now: datetime, cutoff: datetime, limit: int, lease: float
    ) -> list[Claimed]:
        """Lease waiting messages received before `cutoff`, to bounce them unattempted."""
        query = (
            select(messages.c.id)
            .where(
                messages.c.received_at <= cutoff,
                messages.c.state == MessageState.DEFERRED.value,
            )
            .order_by(messages.c.received_at)
            .limit(limit)
        )
        return self._claim(query, owner, now, lease)

    def claim_unwarned(
        self, owner: str, now: datetime, cutoff: datetime, limit: int, lease: float
    ) -> list[Claimed]:
        """Lease waiting messages received before `cutoff` whose sender has not
        been told of the delay yet (parked mail is not attempted, so the
        warning cannot wait for an attempt)."""
        query = (
            select(messages.c.id)
            .where(
                messages.c.received_at <= cutoff,
                messages.c.state == MessageState.DEFERRED.value,
                messages.c.delay_warned.is_(False),
                messages.c.is_dsn.is_(False),
                messages.c.sender != "",
            )
            .order_by(messages.c.received_at)
            .limit(limit)
        )
        return self._claim(query, owner, now, lease)

    def claim_ids(
        self, ids: Sequence[str], owner: str, now: datetime, lease: float
    ) -> list[Claimed]:
        """Lease these messages if they are waiting (deferred or on hold): for operator verbs."""
        waiting = (MessageState.DEFERRED.value, MessageState.HOLD.value)
        query = select(messages.c.id).where(messages.c.id.in_(ids), messages.c.state.in_(waiting))
        return self._claim(query, owner, now, lease, from_states=waiting)

    def _claim(
        self,
        query: Select[tuple[str]],
        owner: str,
        now: datetime,
        lease: float,
        from_states: tuple[str, ...] = (MessageState.DEFERRED.value,),
        orphans: Select[tuple[str]] | None = None,
    ) -> list[Claimed]:
        """Lease what `query` finds in `from_states`, after what `orphans` finds
        (lapsed leases of other nodes, see `nodes.lapsed`), in one transaction."""
        if self._postgres:
            query = query.with_for_update(skip_locked=True)
            if orphans is not None:
                orphans = orphans.with_for_update(skip_locked=True)
        until = now + timedelta(seconds=lease)
        with self._transaction(durable=False) as conn:  # a lost lease is recovered
            found = [] if orphans is None else list(conn.execute(
                orphans.add_columns(messages.c.next_attempt_at)).all())
            taken = {row.id for row in found}
            found += conn.execute(query.add_columns(messages.c.next_attempt_at)).all()
            if not found:
                return []
            ids = [row.id for row in found]
            before = {row.id: row.next_attempt_at for row in found}
            claimable = messages.c.state.in_(from_states)
            rows = conn.execute(
                update(messages)
                .where(messages.c.id.in_(ids), or_(claimable, lapsed(now)) if taken else claimable)
                .values(state=MessageState.ACTIVE.value, lease_owner=owner, lease_expires_at=until)
                .returning(*messages.c)
            ).all()
            down = set(conn.execute(
                select(destinations.c.name).where(
                    destinations.c.name.in_({m.destination for m in rows}),
                    destinations.c.up.is_(False),
                )
            ).scalars())
            rcpts: dict[str, list[PendingRecipient]] = {}
            for r in conn.execute(
                select(recipients)
                .where(recipients.c.message_id.in_(ids), recipients.c.status.in_(PENDING))
                .order_by(recipients.c.id)
            ):
                rcpts.setdefault(r.message_id, []).append(
                    PendingRecipient(r.id, r.address, RecipientStatus(r.status), r.attempts,
                                     RcptParams(notify_words(r.notify), r.orcpt))
                )
        claimed = [
            Claimed(
                id=m.id,
                body_id=m.body_id,
                destination=m.destination,
                sender=m.sender,
                size=m.size,
                received_at=m.received_at,
                smtputf8=m.smtputf8,
                eightbit=m.eightbit,
                is_dsn=m.is_dsn,
                attempts=m.attempts,
                delay_warned=m.delay_warned,
                recipients=tuple(rcpts.get(m.id, ())),
                lease_until=m.lease_expires_at,
                next_attempt_at=before.get(m.id),
                last_error=m.last_error,
                taken_over=m.id in taken,
                probe=m.destination in down,
                dsn=MailParams(m.dsn_ret, m.dsn_envid),
                spf=m.spf,
            )
            for m in rows
        ]
        order = {qid: n for n, qid in enumerate(ids)}
        claimed.sort(key=lambda c: order[c.id])
        return claimed

    # -- recording attempts --------------------------------------------------

    def apply(self, ops: Sequence[NewMessage | Attempt]) -> list[Result]:
        """Group commit: puts and recorded attempts in one transaction (one fsync).

        New messages are inserted together, and attempts that finish their
        message (every recipient delivered or bounced: the common case while
        draining) are applied together: a few statements for the whole batch.
        Should any statement fail, the batch is rolled back and applied again
        one operation per savepoint, so the one that fails is rolled back alone
        and reported in its slot; the others commit. A failing commit raises
        QueueError: then none of them is stored.
        """
        # Accepted mail is fsync'd before its 250; delivery records alone need
        # not be (see db.connect): lost in a power failure, they only mean a
        # message is sent again, as with Postfix's unlink of a delivered file.
        durable = any(isinstance(op, NewMessage) for op in ops)
        try:
            with self._transaction(durable) as conn:
                results = self._apply_together(conn, ops)
                self._learn(conn, _learned(ops, results))
            self._announce_changes()
            return results
        except SQLAlchemyError as exc:
            if len(ops) == 1:
                return [QueueError(one_line(exc))]
        finally:
            self._forget_changes()
        return self._apply_isolated(ops, durable)

    def _apply_together(
        self, conn: Connection, ops: Sequence[NewMessage | Attempt]
    ) -> list[Result]:
        new = [op for op in ops if isinstance(op, NewMessage)]
        if new:
            self._insert(conn, new)
        ending = [op for op in ops if isinstance(op, Attempt) and _ends_message(op)]
        done = self._finish(conn, ending) if ending else {}
        results: list[Result] = []
        for op in ops:
            if isinstance(op, NewMessage):
                results.append(Recorded.STORED)
            elif _ends_message(op):
                results.append(done[op.message_id])
            else:
                results.append(self._record(conn, op))
        return results

    def _apply_isolated(
        self, ops: Sequence[NewMessage | Attempt], durable: bool
    ) -> list[Result]:
        """The slow path after a failure: one savepoint per operation."""
        results: list[Result] = []
        try:
            with self._transaction(durable) as conn:
                for op in ops:
                    kept = len(self._changes())
                    try:
                        with conn.begin_nested():
                            results.append(self._apply_one(conn, op))
                    except SQLAlchemyError as exc:
                        self._forget_changes(kept)
                        results.append(QueueError(one_line(exc)))
                try:
                    with conn.begin_nested():
                        self._learn(conn, _learned(ops, results))
                except SQLAlchemyError as exc:  # knowledge is a hint: never lose a record for it
                    log.warning("learned recipients not stored: %s", one_line(exc))
            self._announce_changes()
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc
        finally:
            self._forget_changes()
        return results

    def _apply_one(self, conn: Connection, op: NewMessage | Attempt) -> Recorded:
        if isinstance(op, NewMessage):
            self._insert(conn, [op])
            return Recorded.STORED
        return self._record(conn, op)

    def _finish(self, conn: Connection, attempts: Sequence[Attempt]) -> dict[str, Recorded]:
        """Apply attempts after which their messages leave the queue, in bulk.

        The DELETE's WHERE clause holds each attempt's lease, so a stale one
        removes nothing; only then (rare) is it told apart from a message
        an operator deleted, by one more read.
        """
        rows = self._remove_leased(
            conn, [Lease(a.message_id, a.owner, a.lease_until) for a in attempts]
        )
        present = {row.id for row in rows}
        missing = [a for a in attempts if a.message_id not in present]
        stale = self._existing(conn, [a.message_id for a in missing]) if missing else set()
        for a in missing:
            if a.message_id in stale:
                _refused(a)
        self._insert_log(conn, [
            (a.message_id, u.address, a.at, u.outcome.value, u.reply, a.remote_host)
            for a in attempts if a.message_id in present
            for u in a.recipients
        ])
        dsns = [dsn for a in attempts if a.message_id not in stale for dsn in a.dsns]
        if dsns:
            self._insert(conn, dsns)
        latest: dict[str, DestinationUpdate] = {}
        quiet: dict[str, AttemptOutcome] = {}
        destination_of = {row.id: row.destination for row in rows}
        for a in attempts:
            if a.message_id not in destination_of:
                continue
            if a.destination is not None and a.destination.outcome.informative:
                latest[a.destination.name] = a.destination
            else:
                quiet[destination_of[a.message_id]] = _outcome(a)
        for update_ in latest.values():
            self._set_destination(conn, update_, attempts[-1].at)
        for name, outcome in quiet.items():
            if name not in latest:
                self._no_word(conn, name, outcome, attempts[-1].at)
        return {
            a.message_id: Recorded.STORED if a.message_id in present
            else Recorded.STALE if a.message_id in stale else Recorded.GONE
            for a in attempts
        }

    def _existing(self, conn: Connection, ids: Sequence[str]) -> set[str]:
        return set(conn.execute(select(messages.c.id).where(messages.c.id.in_(ids))).scalars())

    def record(self, attempt: Attempt) -> Recorded:
        """Apply an attempt: GONE if the message vanished meanwhile (operator
        delete), STALE if its lease is no longer this attempt's claim."""
        try:
            with self.engine.begin() as conn:
                recorded = self._record(conn, attempt)
            self._announce_changes()
            return recorded
        finally:
            self._forget_changes()

    def _record(self, conn: Connection, attempt: Attempt) -> Recorded:
        row = conn.execute(
            select(
                messages.c.state,
                messages.c.lease_owner,
                messages.c.lease_expires_at,
                messages.c.destination,
            ).where(messages.c.id == attempt.message_id)
        ).first()
        if row is None:
            if attempt.dsns:
                self._insert(conn, attempt.dsns)
            return Recorded.GONE
        if row.lease_owner != attempt.owner or row.lease_expires_at != attempt.lease_until:
            _refused(attempt)
            return Recorded.STALE
        for upd in attempt.recipients:
            conn.execute(
                update(recipients)
                .where(recipients.c.id == upd.recipient_id)
                .values(
                    status=upd.status.value,
                    last_reply=upd.reply,
                    last_attempt_at=attempt.at,
                    attempts=recipients.c.attempts + (1 if attempt.counted else 0),
                )
            )
        if attempt.recipients:
            conn.execute(
                insert(delivery_log),
                [
                    {
                        "message_id": attempt.message_id,
                        "recipient": upd.address,
                        "at": attempt.at,
                        "outcome": upd.outcome.value,
                        "reply": upd.reply,
                        "remote_host": attempt.remote_host,
                    }
                    for upd in attempt.recipients
                ],
            )
        if attempt.dsns:
            self._insert(conn, attempt.dsns)
        pending = conn.execute(
            select(func.count())
            .select_from(recipients)
            .where(
                recipients.c.message_id == attempt.message_id, recipients.c.status.in_(PENDING)
            )
        ).scalar_one()
        if pending == 0:
            self._remove(conn, [attempt.message_id])
        else:
            self._requeue(conn, attempt, row.state == MessageState.HOLD.value, row.destination)
        if attempt.destination is not None and attempt.destination.outcome.informative:
            self._set_destination(conn, attempt.destination, attempt.at)
        else:
            self._no_word(conn, row.destination, _outcome(attempt), attempt.at)
        return Recorded.STORED

    def _requeue(self, conn: Connection, attempt: Attempt, held: bool, destination: str) -> None:
        """The message still has pending recipients: back to waiting, lease dropped."""
        next_at = attempt.next_attempt_at
        if next_at is None and not _outcome(attempt).informative:
            # Parked before, but its destination may have come back meanwhile.
            row = conn.execute(
                select(destinations.c.up, destinations.c.retry_at)
                .where(destinations.c.name == destination)
            ).first()
            if row is None or State.of(row.up, row.retry_at) is State.UP:
                next_at = attempt.at
        values: dict[str, Any] = {
            "state": MessageState.HOLD.value if held else MessageState.DEFERRED.value,
            "next_attempt_at": next_at,
            "attempts": messages.c.attempts + (1 if attempt.counted else 0),
            "last_error": attempt.last_error,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if attempt.delay_warned:
            values["delay_warned"] = True
        conn.execute(update(messages).where(messages.c.id == attempt.message_id).values(**values))

    # -- giving back -----------------------------------------------------------

    def recover(self, owner: str | Sequence[str], now: datetime) -> int:
        """Return to the queue what a dead scheduler (ours before a crash, or a
        lapsed lease elsewhere: see `nodes.lapsed`) left active. It is
        retried: never dropped. `owner`: one lease owner or several."""
        owners = (owner,) if isinstance(owner, str) else tuple(owner)
        with self.engine.begin() as conn:
            return conn.execute(
                update(messages)
                .where(
                    messages.c.state == MessageState.ACTIVE.value,
                    or_(messages.c.lease_owner.in_(owners), lapsed(now)),
                )
                .values(
                    state=MessageState.DEFERRED.value,
                    next_attempt_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount

    def unclaim(self, ids: Sequence[str], owner: str, due: datetime) -> int:
        """Give back leased messages unattempted, due at `due` (or, if their
        destination is down, parked until its probe)."""
        if not ids:
            return 0
        with self.engine.begin() as conn:
            count = conn.execute(
                update(messages)
                .where(
                    messages.c.id.in_(ids),
                    messages.c.lease_owner == owner,
                    messages.c.state == MessageState.ACTIVE.value,
                )
                .values(
                    state=MessageState.DEFERRED.value,
                    next_attempt_at=due,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount
            conn.execute(
                update(messages)
                .where(
                    messages.c.id.in_(ids),
                    messages.c.state == MessageState.DEFERRED.value,
                    messages.c.destination.in_(
                        select(destinations.c.name).where(destinations.c.up.is_(False))
                    ),
                )
                .values(next_attempt_at=None)
            )
            return count

    # -- upkeep ------------------------------------------------------------------

    def prune_log(self, before: datetime) -> int:
        with self.engine.begin() as conn:
            return conn.execute(delete(delivery_log).where(delivery_log.c.at < before)).rowcount

    def compact_counts(self) -> int:
        """Fold PostgreSQL's per-backend count shards into shard 0; rows folded.

        Call it now and then (a minute is plenty): shards of backends that are
        gone otherwise accumulate. Skips rows a running transaction holds, and
        returns 0 at once when another process is compacting. SQLite: no-op.
        """
        if not self._postgres:
            return 0
        with self.engine.begin() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_xact_lock(7265616779)")).scalar():
                return 0
            folded = conn.execute(
                text(
                    """WITH folded AS (
    DELETE FROM queue_counts
    WHERE (destination, state, shard) IN (
        SELECT destination, state, shard FROM queue_counts
        WHERE shard <> 0 FOR UPDATE SKIP LOCKED
    )
    RETURNING destination, state, n
)
INSERT INTO queue_counts AS c (destination, state, shard, n)
SELECT destination, state, 0, sum(n) FROM folded GROUP BY destination, state
ON CONFLICT (destination, state, shard) DO UPDATE SET n = c.n + excluded.n"""
                )
            ).rowcount
            conn.execute(
                delete(queue_counts).where(queue_counts.c.shard == 0, queue_counts.c.n == 0)
            )
        return max(folded, 0)


def _learned(ops: Sequence[NewMessage | Attempt],
             results: Sequence[Result]) -> Iterator[tuple[Learned, datetime]]:
    """What the recorded attempts of a batch taught (a refused one taught nothing)."""
    for op, result in zip(ops, results, strict=True):
        if isinstance(op, Attempt) and result is Recorded.STORED:
            for learned in op.learned:
                yield learned, op.at


def _ends_message(attempt: Attempt) -> bool:
    """After this attempt no recipient is pending: the message leaves the queue."""
    return bool(attempt.recipients) and all(u.status.final for u in attempt.recipients)


def _outcome(attempt: Attempt) -> AttemptOutcome:
    """What the attempt says of its destination; without word, it was returned."""
    return attempt.destination.outcome if attempt.destination else AttemptOutcome.RETURNED


def _refused(attempt: Attempt) -> None:
    log.warning(
        "%s: attempt record refused: the message's lease is no longer this claim (%s until %s)",
        attempt.message_id, attempt.owner, attempt.lease_until.isoformat(),
    )
