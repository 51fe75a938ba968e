"""The queue: the only code that writes the database.

Owns every statement against the tables of `schema.py`: putting accepted
mail (one transaction, many messages: group commit), claiming due work
atomically, recording an attempt (recipient states, delivery log, DSN,
destination state and removal in one transaction), and the operator verbs.
Refuses policy: callers decide outcomes, times and DSN bytes; this module
stores them. Methods are synchronous and meant to run in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from ulid import ULID

from relay.core.address import destination_key
from relay.core.model import MessageState, RecipientStatus
from relay.queue.schema import (
    bodies,
    delivery_log,
    destinations,
    messages,
    queue_counts,
    recipients,
)

PENDING = (RecipientStatus.QUEUED.value, RecipientStatus.DEFERRED.value)


class QueueError(Exception):
    """A storage failure; the caller answers 451 or reports one line."""


def new_queue_id() -> str:
    """Queue IDs are ULIDs: unique across relays sharing a queue, sorted by arrival."""
    return str(ULID())


def domain_of(address: str) -> str:
    return destination_key(address.rpartition("@")[2])


@dataclass(frozen=True, slots=True)
class NewMessage:
    """An accepted message, ready to store. `id` is the queue ID given to the client."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    received_at: datetime
    client_address: str = ""
    client_helo: str = ""
    smtputf8: bool = False
    eightbit: bool = False
    is_dsn: bool = False

    def split_by_destination(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(queue id, destination, recipients): one queue entry per recipient domain.

        The first entry keeps the client's queue ID; further ones add ".2", ".3".
        """
        groups: dict[str, list[str]] = {}
        for rcpt in self.recipients:
            groups.setdefault(domain_of(rcpt), []).append(rcpt)
        return [
            (self.id if n == 1 else f"{self.id}.{n}", dest, tuple(rcpts))
            for n, (dest, rcpts) in enumerate(groups.items(), start=1)
        ]


@dataclass(frozen=True, slots=True)
class PendingRecipient:
    id: int
    address: str
    status: RecipientStatus
    attempts: int


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message leased to one scheduler for one attempt."""

    id: str
    body_id: str
    destination: str
    sender: str
    size: int
    received_at: datetime
    smtputf8: bool
    eightbit: bool
    is_dsn: bool
    attempts: int
    delay_warned: bool
    recipients: tuple[PendingRecipient, ...]
    next_attempt_at: datetime | None = None  # as it was before the claim (None: parked)
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    recipient_id: int
    address: str
    status: RecipientStatus
    reply: str
    outcome: str  # model.Outcome value, or "expired", for the delivery log


@dataclass(frozen=True, slots=True)
class DestinationUpdate:
    name: str
    up: bool
    retry_at: datetime | None = None  # next probe when down
    error: str = ""


@dataclass(frozen=True, slots=True)
class Attempt:
    """Everything one attempt changes, applied in one transaction."""

    message_id: str
    owner: str
    at: datetime
    recipients: tuple[RecipientUpdate, ...]
    next_attempt_at: datetime | None  # when still pending; None = parked on its destination
    last_error: str = ""
    remote_host: str = ""
    dsns: tuple[NewMessage, ...] = ()
    destination: DestinationUpdate | None = None
    counted: bool = True  # False for an expiry or operator bounce: no attempt was made
    delay_warned: bool = False


@dataclass(frozen=True, slots=True)
class RecipientView:
    address: str
    status: str
    attempts: int
    last_reply: str


@dataclass(frozen=True, slots=True)
class MessageView:
    id: str
    state: str
    sender: str
    size: int
    received_at: datetime
    next_attempt_at: datetime | None
    attempts: int
    last_error: str
    destination: str
    client_address: str
    recipients: tuple[RecipientView, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Stats:
    total: int
    by_state: dict[str, int]
    by_domain: dict[str, int]
    oldest_received_at: datetime | None


@dataclass(frozen=True, slots=True)
class Selector:
    """Which messages an operator verb targets: IDs, a domain, or all."""

    ids: tuple[str, ...] = ()
    domain: str = ""
    everything: bool = False

    def where(self):  # type: ignore[no-untyped-def]
        clauses = []
        if self.ids:
            clauses.append(messages.c.id.in_(self.ids))
        if self.domain:
            clauses.append(messages.c.destination == destination_key(self.domain))
        if self.everything:
            return True
        if not clauses:
            return False
        return or_(*clauses)


class _RawInsert:
    """A multi-row INSERT run on the DB-API cursor of the transaction's connection.

    For the two hot paths (every accepted message, every finished delivery):
    there SQLAlchemy's work per statement costs more than the database's, and
    every statement the driver steps gives the GIL up and must win it back
    from the event loop, so all rows go in one statement (VALUES (...), (...)).
    Values go through each column type's own bind processor, so rows are
    stored exactly as Core would store them; driver errors are wrapped as
    Core wraps them, so savepoints and QueueError work the same.
    """

    ROWS_PER_STATEMENT = 500  # 16 columns x 500 stays under SQLite's 32,766 parameters

    def __init__(self, table: Table, columns: Sequence[str], engine: Engine,
                 expressions: Mapping[str, tuple[str, int]] | None = None) -> None:
        """`expressions`: columns whose value SQL computes, as (template, number
        of parameters); a row gives that many values for the column, the last
        of which goes through the column's bind processor."""
        dialect = engine.dialect
        quote = dialect.identifier_preparer.quote
        marker = _marker(dialect)
        self._head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
        values: list[str] = []
        self._processors: list[Any] = []
        for column in columns:
            template, count = (expressions or {}).get(column, ("{}", 1))
            values.append(template.format(*[marker] * count))
            self._processors += [None] * (count - 1)
            self._processors.append(table.c[column].type.bind_processor(dialect))
        self._row = f"({', '.join(values)})"
        self._statements: dict[int, str] = {}

    def __call__(self, conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
        processors = self._processors
        for start in range(0, len(rows), self.ROWS_PER_STATEMENT):
            chunk = rows[start:start + self.ROWS_PER_STATEMENT]
            values = [
                v if p is None else p(v)
                for row in chunk
                for p, v in zip(processors, row, strict=True)
            ]
            _raw(conn, self._statement(len(chunk)), values)

    def _statement(self, rows: int) -> str:
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = self._head + "VALUES " + ", ".join([self._row] * rows)
        return sql


IDS_PER_STATEMENT = 500  # an operator's "delete --all" may name a million


def _chunks(items: Sequence[str]) -> Iterator[list[str]]:
    """`items` in lists short enough for one statement's parameters."""
    for start in range(0, len(items), IDS_PER_STATEMENT):
        yield list(items[start:start + IDS_PER_STATEMENT])


def _marker(dialect: Dialect) -> str:
    """The driver's positional parameter marker: SQLite's `?`, psycopg's `%s`."""
    return "?" if dialect.paramstyle == "qmark" else "%s"


def _raw(conn: Connection, sql: str, params: Sequence[Any], many: bool = False) -> list[Any]:
    """Run `sql` on the DB-API cursor of `conn` (in its transaction); the rows
    of a query. Driver errors are wrapped as Core wraps them."""
    error: type[Exception] = conn.dialect.loaded_dbapi.Error
    cursor = conn.connection.cursor()
    try:
        if many:
            cursor.executemany(sql, params)
            return []
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []
    except error as exc:
        raise DBAPIError.instance(sql, params, exc, error) from exc
    finally:
        cursor.close()


class _Removed(NamedTuple):
    id: str
    destination: str
    body_id: str


_MESSAGE_COLUMNS = (
    "id", "body_id", "destination", "sender", "size", "received_at", "client_address",
    "client_helo", "smtputf8", "eightbit", "is_dsn", "state", "next_attempt_at", "attempts",
    "last_error", "delay_warned",
)
_RECIPIENT_COLUMNS = ("message_id", "address", "status", "attempts", "last_reply")
_LOG_COLUMNS = ("message_id", "recipient", "at", "outcome", "reply", "remote_host")


class _HeldConnection(threading.local):
    """The connection a thread keeps between transactions (`Queue.holding_connection`)."""

    active = False
    conn: Connection | None = None

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with suppress(SQLAlchemyError):  # a broken connection: the pool discards it
                conn.close()


class Queue:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._marker = _marker(engine.dialect)
        self._insert_bodies = _RawInsert(bodies, ("id", "data"), engine)
        self._insert_messages = _RawInsert(messages, _MESSAGE_COLUMNS, engine, {
            "next_attempt_at": ("CASE WHEN EXISTS (SELECT 1 FROM destinations"
                                " WHERE name = {} AND NOT up) THEN NULL ELSE {} END", 2),
        })
        self._insert_recipients = _RawInsert(recipients, _RECIPIENT_COLUMNS, engine)
        self._insert_log = _RawInsert(delivery_log, _LOG_COLUMNS, engine)
        self._held = _HeldConnection()

    @contextmanager
    def holding_connection(self) -> Iterator[None]:
        """Within the block, this thread's write transactions share one SQLite
        connection instead of taking one from the pool each time: the writer
        thread's, where a checkout and check-in cost a third of a put's own
        work. Not on PostgreSQL: there the pool's ping at every checkout is
        what notices a restarted server before a transaction fails on it."""
        held = self._held
        held.active = not self._postgres
        try:
            yield
        finally:
            held.active = False
            held.drop()

    @contextmanager
    def _transaction(self, durable: bool = True) -> Iterator[Connection]:
        """A write transaction; `durable=False`: its commit need not reach the disk
        before we go on (see db.connect)."""
        held = self._held
        if not held.active:
            with self.engine.connect().execution_options(durable=durable) as conn, conn.begin():
                yield conn
            return
        if held.conn is None:
            held.conn = self.engine.connect()
        conn = held.conn.execution_options(durable=durable)  # set in place
        try:
            with conn.begin():
                yield conn
        except BaseException:
            # After a failure (a full disk, a server gone) the next
            # transaction starts on a fresh connection.
            held.drop()
            raise

    # -- accept side -------------------------------------------------------

    def put_many(self, batch: Sequence[NewMessage]) -> None:
        """Store messages in one transaction: one fsync for the whole batch."""
        try:
            with self.engine.begin() as conn:
                self._insert(conn, batch)
        except SQLAlchemyError as exc:
            raise QueueError(_one_line(exc)) from exc

    def _insert(self, conn: Connection, batch: Sequence[NewMessage]) -> None:
        if not batch:
            return
        entries = [(m, *entry) for m in batch for entry in m.split_by_destination()]
        self._insert_bodies(conn, [(m.id, m.data) for m in batch])
        deferred = MessageState.DEFERRED.value
        self._insert_messages(conn, [
            (qid, m.id, dest, m.sender, len(m.data), m.received_at, m.client_address,
             m.client_helo, m.smtputf8, m.eightbit, m.is_dsn, deferred,
             dest, m.received_at,  # due now, or parked if its destination is down
             0, "",
             # nobody to warn for a null sender: never in the sweep's way
             m.is_dsn or m.sender == "")
            for m, qid, dest, _ in entries
        ])
        queued = RecipientStatus.QUEUED.value
        self._insert_recipients(conn, [
            (qid, rcpt, queued, 0, "") for _, qid, _, rcpts in entries for rcpt in rcpts
        ])

    # -- scheduler side ----------------------------------------------------

    def claim_due(
        self,
        owner: str,
        now: datetime,
        limit: int,
        lease: float,
        exclude_destinations: Iterable[str] = (),
    ) -> list[Claimed]:
        """Lease up to `limit` due messages, oldest due first; atomic across processes."""
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
        return self._claim(query, owner, now, lease)

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
        query = select(messages.c.id).where(
            messages.c.id.in_(ids),
            messages.c.state.in_((MessageState.DEFERRED.value, MessageState.HOLD.value)),
        )
        return self._claim(
            query,
            owner,
            now,
            lease,
            from_states=(MessageState.DEFERRED.value, MessageState.HOLD.value),
        )

    def _claim(  # type: ignore[no-untyped-def]
        self,
        query,
        owner: str,
        now: datetime,
        lease: float,
        from_states: tuple[str, ...] = (MessageState.DEFERRED.value,),
    ) -> list[Claimed]:
        if self._postgres:
            query = query.with_for_update(skip_locked=True)
        until = now + timedelta(seconds=lease)
        with self._transaction(durable=False) as conn:  # a lost lease is recovered
            found = conn.execute(query.add_columns(messages.c.next_attempt_at)).all()
            if not found:
                return []
            ids = [row.id for row in found]
            before = {row.id: row.next_attempt_at for row in found}
            rows = conn.execute(
                update(messages)
                .where(messages.c.id.in_(ids), messages.c.state.in_(from_states))
                .values(state=MessageState.ACTIVE.value, lease_owner=owner, lease_expires_at=until)
                .returning(*messages.c)
            ).all()
            rcpts: dict[str, list[PendingRecipient]] = {}
            for r in conn.execute(
                select(recipients)
                .where(recipients.c.message_id.in_(ids), recipients.c.status.in_(PENDING))
                .order_by(recipients.c.id)
            ):
                rcpts.setdefault(r.message_id, []).append(
                    PendingRecipient(r.id, r.address, RecipientStatus(r.status), r.attempts)
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
                next_attempt_at=before.get(m.id),
                last_error=m.last_error,
            )
            for m in rows
        ]
        order = {qid: n for n, qid in enumerate(ids)}
        claimed.sort(key=lambda c: order[c.id])
        return claimed

    def body(self, body_id: str) -> bytes:
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            data = conn.execute(select(bodies.c.data).where(bodies.c.id == body_id)).scalar()
        if data is None:
            raise QueueError(f"body {body_id} is missing")
        return bytes(data)

    def bodies(self, body_ids: Iterable[str]) -> dict[str, bytes]:
        """Several bodies in one read (those that are gone are left out)."""
        wanted = list(set(body_ids))
        if not wanted:
            return {}
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            rows = conn.execute(
                select(bodies.c.id, bodies.c.data).where(bodies.c.id.in_(wanted))
            ).all()
        return {row.id: bytes(row.data) for row in rows}

    def apply(self, ops: Sequence[NewMessage | Attempt]) -> list[bool | QueueError]:
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
                return self._apply_together(conn, ops)
        except SQLAlchemyError as exc:
            if len(ops) == 1:
                return [QueueError(_one_line(exc))]
        return self._apply_isolated(ops, durable)

    def _apply_together(
        self, conn: Connection, ops: Sequence[NewMessage | Attempt]
    ) -> list[bool | QueueError]:
        new = [op for op in ops if isinstance(op, NewMessage)]
        if new:
            self._insert(conn, new)
        ending = [op for op in ops if isinstance(op, Attempt) and _ends_message(op)]
        done = self._finish(conn, ending) if ending else set()
        results: list[bool | QueueError] = []
        for op in ops:
            if isinstance(op, NewMessage):
                results.append(True)
            elif _ends_message(op):
                results.append(op.message_id in done)
            else:
                results.append(self._record(conn, op))
        return results

    def _apply_isolated(
        self, ops: Sequence[NewMessage | Attempt], durable: bool
    ) -> list[bool | QueueError]:
        """The slow path after a failure: one savepoint per operation."""
        results: list[bool | QueueError] = []
        try:
            with self._transaction(durable) as conn:
                for op in ops:
                    try:
                        with conn.begin_nested():
                            results.append(self._apply_one(conn, op))
                    except SQLAlchemyError as exc:
                        results.append(QueueError(_one_line(exc)))
        except SQLAlchemyError as exc:
            raise QueueError(_one_line(exc)) from exc
        return results

    def _apply_one(self, conn: Connection, op: NewMessage | Attempt) -> bool:
        if isinstance(op, NewMessage):
            self._insert(conn, [op])
            return True
        return self._record(conn, op)

    def _finish(self, conn: Connection, attempts: Sequence[Attempt]) -> set[str]:
        """Apply attempts after which their messages leave the queue, in bulk."""
        rows = self._remove(conn, [a.message_id for a in attempts])
        present = {row.id for row in rows}
        self._insert_log(conn, [
            (a.message_id, u.address, a.at, u.outcome, u.reply, a.remote_host)
            for a in attempts if a.message_id in present
            for u in a.recipients
        ])
        dsns = [dsn for a in attempts for dsn in a.dsns]
        if dsns:
            self._insert(conn, dsns)
        latest: dict[str, DestinationUpdate] = {}
        silent: set[str] = set()
        destination_of = {row.id: row.destination for row in rows}
        for a in attempts:
            if a.destination is not None:
                latest[a.destination.name] = a.destination
            elif a.message_id in destination_of:
                silent.add(destination_of[a.message_id])
        for update_ in latest.values():
            self._set_destination(conn, update_, attempts[-1].at)
        for name in silent - set(latest):
            self._reprobe(conn, name, attempts[-1].at)
        return present

    def record(self, attempt: Attempt) -> bool:
        """Apply an attempt; False if the message vanished meanwhile (operator delete)."""
        with self.engine.begin() as conn:
            return self._record(conn, attempt)

    def _record(self, conn: Connection, attempt: Attempt) -> bool:
        row = conn.execute(
            select(
                messages.c.state,
                messages.c.lease_owner,
                messages.c.body_id,
                messages.c.destination,
            ).where(messages.c.id == attempt.message_id)
        ).first()
        if row is None:
            if attempt.dsns:
                self._insert(conn, attempt.dsns)
            return False
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
                        "outcome": upd.outcome,
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
            held = row.state == MessageState.HOLD.value
            next_at = attempt.next_attempt_at
            if next_at is None and attempt.destination is None:
                # Parked before, but its destination may have come back meanwhile.
                up = conn.execute(
                    select(destinations.c.up).where(destinations.c.name == row.destination)
                ).scalar()
                if up is None or up:
                    next_at = attempt.at
            values = {
                "state": MessageState.HOLD.value if held else MessageState.DEFERRED.value,
                "next_attempt_at": next_at,
                "attempts": messages.c.attempts + (1 if attempt.counted else 0),
                "last_error": attempt.last_error,
                "lease_owner": None,
                "lease_expires_at": None,
            }
            if attempt.delay_warned:
                values["delay_warned"] = True
            conn.execute(
                update(messages).where(messages.c.id == attempt.message_id).values(**values)
            )
        if attempt.destination is not None:
            self._set_destination(conn, attempt.destination, attempt.at)
        else:
            self._reprobe(conn, row.destination, attempt.at)
        return True

    def _reprobe(self, conn: Connection, destination: str, now: datetime) -> None:
        """No word on the destination (an expired or returned message): if it was
        the probe of a down destination, probe again on the next pass."""
        conn.execute(
            update(destinations)
            .where(
                destinations.c.name == destination,
                destinations.c.up.is_(False),
                destinations.c.retry_at.is_(None),
            )
            .values(retry_at=now)
        )

    def _set_destination(self, conn: Connection, dest: DestinationUpdate, now: datetime) -> None:
        prior = conn.execute(
            select(destinations.c.up, destinations.c.failures, destinations.c.retry_at).where(
                destinations.c.name == dest.name
            )
        ).first()
        was_up = prior is None or prior.up
        if dest.up:
            if was_up:
                return  # the common case: nothing changes, nothing written
            conn.execute(
                update(destinations)
                .where(destinations.c.name == dest.name)
                .values(up=True, failures=0, retry_at=None, last_error="", updated_at=now)
            )
            self._unpark(conn, dest.name, now)
            return
        if prior is not None and not prior.up and prior.retry_at is not None:
            # Already down and no probe running: several sessions failed at
            # once. That is one backoff step, not several.
            values = {"last_error": dest.error, "updated_at": now}
        else:
            values = {
                "up": False,
                "failures": (prior.failures if prior else 0) + 1,
                "retry_at": dest.retry_at,
                "last_error": dest.error,
                "updated_at": now,
            }
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
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            value = conn.execute(
                select(destinations.c.failures).where(destinations.c.name == destination)
            ).scalar()
        return int(value or 0)

    def start_probes(self, now: datetime, stale_before: datetime) -> list[str]:
        """Make one parked message due for each down destination whose retry time came.

        The destination's retry time is cleared while its probe runs, so it is
        probed once; a probe lost to a crash is retried after `stale_before`.
        """
        probed = []
        with self.engine.begin() as conn:
            due = (
                conn.execute(
                    select(destinations.c.name).where(
                        destinations.c.up.is_(False),
                        or_(
                            destinations.c.retry_at <= now,
                            and_(
                                destinations.c.retry_at.is_(None),
                                destinations.c.updated_at <= stale_before,
                            ),
                        ),
                    )
                )
                .scalars()
                .all()
            )
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
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            return {
                row.name: row.retry_at
                for row in conn.execute(
                    select(destinations.c.name, destinations.c.retry_at).where(
                        destinations.c.up.is_(False)
                    )
                )
            }

    def recover(self, owner: str, now: datetime) -> int:
        """Return to the queue what a dead scheduler (ours before a crash, or an
        expired lease elsewhere) left active. It is retried: never dropped."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(messages)
                .where(
                    messages.c.state == MessageState.ACTIVE.value,
                    or_(messages.c.lease_owner == owner, messages.c.lease_expires_at < now),
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

    def prune_log(self, before: datetime) -> int:
        with self.engine.begin() as conn:
            return conn.execute(delete(delivery_log).where(delivery_log.c.at < before)).rowcount

    # -- operator verbs ------------------------------------------------------

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
                .where(selector.where(), messages.c.state == MessageState.DEFERRED.value)
                .values(next_attempt_at=now)
            ).rowcount

    def hold(self, selector: Selector) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                update(messages)
                .where(selector.where(), messages.c.state != MessageState.HOLD.value)
                .values(state=MessageState.HOLD.value)
            ).rowcount

    def release(self, selector: Selector, now: datetime) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                update(messages)
                .where(selector.where(), messages.c.state == MessageState.HOLD.value)
                .values(
                    state=MessageState.DEFERRED.value,
                    next_attempt_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount

    def delete(self, selector: Selector) -> int:
        with self.engine.begin() as conn:
            ids = conn.execute(select(messages.c.id).where(selector.where())).scalars().all()
            self._remove(conn, ids)
            return len(ids)

    def _remove(self, conn: Connection, ids: Sequence[str]) -> list[_Removed]:
        """Delete these messages (their recipients go by ON DELETE CASCADE) and
        bodies no other entry shares; rows (id, destination, body_id) of those
        that were there."""
        rows: list[_Removed] = []
        for chunk in _chunks(ids):
            rows += [
                _Removed(*row)
                for row in _raw(
                    conn,
                    f"DELETE FROM messages WHERE id IN ({self._markers(len(chunk))})"
                    " RETURNING id, destination, body_id",
                    chunk,
                )
            ]
        for chunk in _chunks(sorted({row.body_id for row in rows})):
            _raw(
                conn,
                f"DELETE FROM bodies WHERE id IN ({self._markers(len(chunk))})"
                " AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.body_id = bodies.id)",
                chunk,
            )
        return rows

    def _markers(self, n: int) -> str:
        return ", ".join([self._marker] * n)

    def existing(self, ids: Iterable[str]) -> set[str]:
        wanted = list(ids)
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            return set(
                conn.execute(select(messages.c.id).where(messages.c.id.in_(wanted))).scalars()
            )

    # -- views ---------------------------------------------------------------

    def list(self, domain: str = "", state: str = "", ids: Sequence[str] = ()) -> list[MessageView]:
        query = select(messages).order_by(messages.c.id)
        if domain:
            query = query.where(messages.c.destination == destination_key(domain))
        if state:
            query = query.where(messages.c.state == state)
        if ids:
            query = query.where(messages.c.id.in_(ids))
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn, conn.begin():
            rows = conn.execute(query).all()
            rcpts: dict[str, list[RecipientView]] = {}
            wanted = [r.id for r in rows]
            for chunk_start in range(0, len(wanted), 500):
                chunk = wanted[chunk_start : chunk_start + 500]
                for r in conn.execute(
                    select(recipients)
                    .where(recipients.c.message_id.in_(chunk))
                    .order_by(recipients.c.id)
                ):
                    rcpts.setdefault(r.message_id, []).append(
                        RecipientView(r.address, r.status, r.attempts, r.last_reply)
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
            )
            for m in rows
        ]

    def show(self, message_id: str) -> MessageView | None:
        found = self.list(ids=[message_id])
        return found[0] if found else None

    def history(self, message_id: str) -> list[tuple[datetime, str, str, str, str]]:
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            return [
                (r.at, r.recipient, r.outcome, r.reply, r.remote_host)
                for r in conn.execute(
                    select(delivery_log)
                    .where(delivery_log.c.message_id == message_id)
                    .order_by(delivery_log.c.id)
                )
            ]

    def raw(self, message_id: str) -> bytes | None:
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            data = conn.execute(
                select(bodies.c.data)
                .join(messages, messages.c.body_id == bodies.c.id)
                .where(messages.c.id == message_id)
            ).scalar()
        return None if data is None else bytes(data)

    def stats(self) -> Stats:
        """Counts by state and by domain (non-zero ones only), from `queue_counts`."""
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn, conn.begin():
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

    # -- queue depth (metrics, health) ---------------------------------------
    #
    # `queue_counts` is kept by triggers (see schema.py): these reads cost a
    # few rows however long the queue is, and every process sharing the
    # database reads the same numbers.

    def _count_rows(self, conn: Connection) -> list[tuple[str, str, int]]:
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
            with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
                for state, total in conn.execute(query):
                    if total or state in result:
                        result[state] = int(total)
        except SQLAlchemyError as exc:
            raise QueueError(_one_line(exc)) from exc
        return result

    def counts_by_destination(self) -> dict[str, dict[str, int]]:
        """{destination: {state: n}} for destinations with messages; every state present."""
        try:
            with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
                rows = self._count_rows(conn)
        except SQLAlchemyError as exc:
            raise QueueError(_one_line(exc)) from exc
        result: dict[str, dict[str, int]] = {}
        for destination, state, n in rows:
            per = result.setdefault(destination, {s.value: 0 for s in MessageState})
            per[state] = per.get(state, 0) + n
        return {d: per for d, per in result.items() if any(per.values())}

    def oldest_received_at(self) -> datetime | None:
        """When the oldest queued message arrived; min() on an index: O(log n)."""
        try:
            with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
                value: datetime | None = conn.execute(
                    select(func.min(messages.c.received_at))
                ).scalar()
        except SQLAlchemyError as exc:
            raise QueueError(_one_line(exc)) from exc
        return value

    def ping(self) -> None:
        """Raise QueueError unless the database answers a trivial query."""
        try:
            with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
                conn.execute(select(literal(1))).scalar_one()
        except SQLAlchemyError as exc:
            raise QueueError(_one_line(exc)) from exc

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


def _ends_message(attempt: Attempt) -> bool:
    """After this attempt no recipient is pending: the message leaves the queue."""
    return bool(attempt.recipients) and all(u.status.final for u in attempt.recipients)


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__
