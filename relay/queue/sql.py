"""The queue's SQL plumbing: connections, transactions and the raw fast paths.

Owns what every part of the queue shares: the engine and the write
transaction (with the writer thread's held SQLite connection), the raw
multi-row INSERT and DELETE used on the hot paths, the statements that add
and remove messages, and turning driver errors into one-line QueueErrors.
Refuses decisions: which rows to write, and when, is the caller's.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Connection, Engine, Table, false, or_, true
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.types import TypeEngine

from relay.core.address import destination_key
from relay.core.dsnparams import NO_RCPT_PARAMS, notify_text
from relay.core.model import MessageState, RecipientStatus
from relay.queue.rows import NewMessage, QueueError, Selector
from relay.queue.schema import bodies, delivery_log, messages, recipients

PENDING = (RecipientStatus.QUEUED.value, RecipientStatus.DEFERRED.value)
IDS_PER_STATEMENT = 500  # an operator's "delete --all" may name a million

_MESSAGE_COLUMNS = (
    "id", "body_id", "destination", "sender", "size", "received_at", "client_address",
    "client_helo", "smtputf8", "eightbit", "is_dsn", "state", "next_attempt_at", "attempts",
    "last_error", "delay_warned", "dsn_ret", "dsn_envid", "spf",
)
_RECIPIENT_COLUMNS = (
    "message_id", "address", "status", "attempts", "last_reply", "notify", "orcpt",
)
_LOG_COLUMNS = ("message_id", "recipient", "at", "outcome", "reply", "remote_host")


class RawInsert:
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
                 expressions: Mapping[str, tuple[str, int]] | None = None,
                 tail: str = "", exact: bool = False) -> None:
        """`expressions`: columns whose value SQL computes, as (template, number
        of parameters); a row gives that many values for the column, the last
        of which goes through the column's bind processor. `tail`: SQL after
        the values (an `ON CONFLICT` clause). `exact`: bind values as Core binds
        them in a WHERE clause (`_bind_processor`), for rows that are later
        compared with such values."""
        self._tail = tail
        dialect = engine.dialect
        quote = dialect.identifier_preparer.quote
        marker = placeholder(dialect)
        self._head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
        values: list[str] = []
        self._processors: list[Any] = []
        for column in columns:
            template, count = (expressions or {}).get(column, ("{}", 1))
            values.append(template.format(*[marker] * count))
            self._processors += [None] * (count - 1)
            type_ = table.c[column].type
            self._processors.append(_bind_processor(type_, dialect) if exact
                                    else type_.bind_processor(dialect))
        self._row = f"({', '.join(values)})"
        self._statements: dict[int, str] = {}

    def __call__(self, conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
        for sql, values in self.statements(rows):
            raw(conn, sql, values)

    def statements(self, rows: Sequence[Sequence[Any]]) -> list[tuple[str, list[Any]]]:
        """The statements (SQL and values) that insert `rows`."""
        processors = self._processors
        made = []
        for start in range(0, len(rows), self.ROWS_PER_STATEMENT):
            chunk = rows[start:start + self.ROWS_PER_STATEMENT]
            values = [
                v if p is None else p(v)
                for row in chunk
                for p, v in zip(processors, row, strict=True)
            ]
            made.append((self._statement(len(chunk)), values))
        return made

    def _statement(self, rows: int) -> str:
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = (self._head + "VALUES " + ", ".join([self._row] * rows)
                                            + self._tail)
        return sql


def _bind_processor(type_: TypeEngine[Any], dialect: Dialect) -> Any:
    """The column type's bind processor as Core runs it on this dialect: for
    a TypeDecorator, the dialect's own processor after ours, so a value bound
    here is the very text Core stored on SQLite (microseconds included) and
    compares equal to it."""
    return type_.dialect_impl(dialect).bind_processor(dialect)


def chunks(items: Sequence[Any]) -> Iterator[list[Any]]:
    """`items` in lists short enough for one statement's parameters."""
    for start in range(0, len(items), IDS_PER_STATEMENT):
        yield list(items[start:start + IDS_PER_STATEMENT])


def placeholder(dialect: Dialect) -> str:
    """The driver's positional parameter marker: SQLite's `?`, psycopg's `%s`."""
    return "?" if dialect.paramstyle == "qmark" else "%s"


def raw(conn: Connection, sql: str, params: Sequence[Any], many: bool = False) -> list[Any]:
    """Run `sql` on the DB-API cursor of `conn` (in its transaction); the rows
    of a query. Driver errors are wrapped as Core wraps them."""
    error: type[Exception] = conn.dialect.loaded_dbapi.Error
    cursor = conn.connection.cursor()
    try:
        if many:
            cursor.executemany(sql, params)
            return []
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []
    except error as exc:
        raise DBAPIError.instance(sql, params, exc, error) from exc
    finally:
        cursor.close()


def one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def selected(selector: Selector) -> ColumnElement[bool]:
    """The WHERE clause on `messages` of an operator's selector."""
    if selector.everything:
        return true()
    clauses: list[ColumnElement[bool]] = []
    if selector.ids:
        clauses.append(messages.c.id.in_(selector.ids))
    if selector.domain:
        clauses.append(messages.c.destination == destination_key(selector.domain))
    return or_(*clauses) if clauses else false()


class Removed(NamedTuple):
    id: str
    destination: str
    body_id: str


class Lease(NamedTuple):
    """The claim a removal must still find on its message."""

    message_id: str
    owner: str
    until: datetime


IDLE_CHECK = 10.0  # seconds a held PostgreSQL connection may rest before the pool pings it


class _HeldConnection(threading.local):
    """The connection a thread keeps between transactions (`holding_connection`)."""

    active = False
    conn: Connection | None = None
    used = 0.0  # time.monotonic() at the end of its last transaction

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with suppress(SQLAlchemyError):  # a broken connection: the pool discards it
                conn.close()

    def check(self) -> None:
        """PostgreSQL: drop a held connection the server may have left, so the
        next transaction takes one through the pool's ping: after IDLE_CHECK
        at rest, or when the server spoke unasked (`_server_spoke`)."""
        conn = self.conn
        if conn is not None and (time.monotonic() - self.used > IDLE_CHECK
                                 or _server_spoke(conn)):
            self.drop()


def _server_spoke(conn: Connection) -> bool:
    """Whether PostgreSQL sent anything to a connection between transactions,
    or closed it: a server shutting down or restarting, or ending our backend,
    sends its FATAL error, then closes the socket. One poll(2), no round trip."""
    try:
        raw: Any = conn.connection.dbapi_connection
        if raw is None or raw.closed or raw.broken:
            return True
        readable, _, _ = select.select([raw.pgconn.socket], [], [], 0)
    except Exception:  # closed under us, or not psycopg: take no chances
        return True
    return bool(readable)


class QueueBase:
    """The engine, its transactions, and adding and removing messages: what
    every part of the queue builds on."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._marker = placeholder(engine.dialect)
        self._insert_bodies = RawInsert(bodies, ("id", "data"), engine)
        self._insert_messages = RawInsert(messages, _MESSAGE_COLUMNS, engine, {
            "next_attempt_at": ("CASE WHEN EXISTS (SELECT 1 FROM destinations"
                                " WHERE name = {} AND NOT up) THEN NULL ELSE {} END", 2),
        })
        self._insert_recipients = RawInsert(recipients, _RECIPIENT_COLUMNS, engine)
        self._insert_log = RawInsert(delivery_log, _LOG_COLUMNS, engine)
        self._lease_bind = _bind_processor(messages.c.lease_expires_at.type, engine.dialect)
        self._held = _HeldConnection()

    @contextmanager
    def holding_connection(self) -> Iterator[None]:
        """Within the block, this thread's write transactions share one
        connection instead of taking one from the pool each time: the writer
        thread's, where a checkout and check-in cost a third of a put's own
        work, and on PostgreSQL the pool's ping one more round trip per commit.
        That ping notices a restarted server before a transaction fails on it:
        a held PostgreSQL connection is checked instead, without a round trip
        (`_HeldConnection.check`)."""
        held = self._held
        held.active = True
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
        if self._postgres:
            held.check()
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
        if self._postgres:
            held.used = time.monotonic()

    def write_ping(self) -> None:
        """Take the write lock and let it go (an empty write transaction):
        QueueError unless a write could commit now. What the store probes with
        while the database is locked (`store.Store.write_problem`)."""
        try:
            with self._transaction(durable=False):
                pass
        except SQLAlchemyError as exc:
            raise QueueError(one_line(exc)) from exc

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection for reads (a deferred SQLite transaction: no write lock)."""
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            yield conn

    def _insert(self, conn: Connection, batch: Sequence[NewMessage]) -> None:
        if not batch:
            return
        entries = [(m, *entry) for m in batch for entry in m.split_by_destination()]
        statements = self._insert_bodies.statements([(m.id, m.data) for m in batch])
        deferred = MessageState.DEFERRED.value
        statements += self._insert_messages.statements([
            (qid, m.id, dest, m.sender, len(m.data), m.received_at, m.client_address,
             m.client_helo, m.smtputf8, m.eightbit, m.is_dsn, deferred,
             dest, m.received_at,  # due now, or parked if its destination is down
             0, "",
             # nobody to warn for a null sender: never in the sweep's way
             m.is_dsn or m.sender == "",
             m.dsn.ret, m.dsn.envid, m.spf)
            for m, qid, dest, _ in entries
        ])
        queued = RecipientStatus.QUEUED.value
        rows = []
        for m, qid, _, rcpts in entries:
            given = dict(m.rcpt_dsn)  # RFC 3461 NOTIFY, ORCPT of those that gave any
            for rcpt in rcpts:
                p = given.get(rcpt, NO_RCPT_PARAMS)
                rows.append((qid, rcpt, queued, 0, "", notify_text(p.notify), p.orcpt))
        statements += self._insert_recipients.statements(rows)
        if self._postgres and len(statements) == 3:  # one round trip, not three
            (bodies_sql, bodies_values), (messages_sql, messages_values), last = statements
            statements = [(f"WITH b AS ({bodies_sql}), m AS ({messages_sql}) {last[0]}",
                           [*bodies_values, *messages_values, *last[1]])]
        for sql, values in statements:
            raw(conn, sql, values)

    def _remove(self, conn: Connection, ids: Sequence[str]) -> list[Removed]:
        """Delete these messages (their recipients go by ON DELETE CASCADE) and
        bodies no other entry shares; rows (id, destination, body_id) of those
        that were there."""
        rows: list[Removed] = []
        for chunk in chunks(ids):
            rows += self._delete_returning(conn, f"id IN ({self._markers(len(chunk))})", chunk)
        self._drop_bodies(conn, rows)
        return rows

    def _remove_leased(self, conn: Connection, leases: Sequence[Lease]) -> list[Removed]:
        """As `_remove`, but only the messages still under these very leases:
        one statement per 500, the lease checked in its WHERE clause."""
        rows: list[Removed] = []
        bind = self._lease_bind
        for chunk in chunks(leases):
            # `id IN (...)` finds the rows by primary key; the row values then
            # check each one's lease (alone, they would scan the table).
            row = f"({self._markers(3)})"
            params: list[Any] = [lease.message_id for lease in chunk]
            params += [v for lease in chunk
                       for v in (lease.message_id, lease.owner,
                                 bind(lease.until) if bind else lease.until)]
            rows += self._delete_returning(
                conn,
                f"id IN ({self._markers(len(chunk))}) AND (id, lease_owner, lease_expires_at)"
                f" IN (VALUES {', '.join([row] * len(chunk))})",
                params,
            )
        self._drop_bodies(conn, rows)
        return rows

    def _delete_returning(self, conn: Connection, where: str, params: list[Any]) -> list[Removed]:
        sql = f"DELETE FROM messages WHERE {where} RETURNING id, destination, body_id"
        return [Removed(*row) for row in raw(conn, sql, params)]

    def _drop_bodies(self, conn: Connection, rows: Sequence[Removed]) -> None:
        for chunk in chunks(sorted({row.body_id for row in rows})):
            raw(
                conn,
                f"DELETE FROM bodies WHERE id IN ({self._markers(len(chunk))})"
                " AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.body_id = bodies.id)",
                chunk,
            )

    def _markers(self, n: int) -> str:
        return ", ".join([self._marker] * n)
