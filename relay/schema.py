"""Tables of the queue, in portable SQLAlchemy Core (SQLite and PostgreSQL).

Owns table and index definitions only; `queue.py` is the one module that
reads and writes them, and `migrations/` carries every change to them.

Layout, after OpenSMTPD: a message body is written once (`bodies`); the
scheduler works on small `messages` rows (one per accepted message and
destination domain) and their `recipients`, and never reads a body until it
delivers. Outcomes outlive the message in `delivery_log`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend.

    Stored naive in UTC so that SQLite (which keeps no zone) and PostgreSQL
    compare and index the values the same way.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the queue; use aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


bodies = Table(
    "bodies",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("data", LargeBinary, nullable=False),  # exact bytes, our Received header first
)

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),  # queue ID (ULID: sorts by arrival)
    Column("body_id", String(32), ForeignKey("bodies.id"), nullable=False, index=True),
    Column("destination", String(255), nullable=False),  # recipient domain, lower case
    Column("sender", String(998), nullable=False),  # "" = null sender
    Column("size", Integer, nullable=False),
    Column("received_at", UtcDateTime, nullable=False, index=True),
    Column("client_address", String(64), nullable=False, default=""),
    Column("client_helo", String(255), nullable=False, default=""),
    Column("smtputf8", Boolean, nullable=False, default=False),
    Column("eightbit", Boolean, nullable=False, default=False),
    Column("is_dsn", Boolean, nullable=False, default=False),
    # Scheduling: see model.MessageState. next_attempt_at is NULL while the
    # message waits on its destination being down (parked).
    Column("state", String(16), nullable=False),
    Column("next_attempt_at", UtcDateTime, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=False, default=""),
    Column("lease_owner", String(255), nullable=True),
    Column("lease_expires_at", UtcDateTime, nullable=True),
    Column("delay_warned", Boolean, nullable=False, default=False),
    Index("ix_messages_due", "state", "next_attempt_at"),
    Index("ix_messages_destination", "destination", "state"),
)

recipients = Table(
    "recipients",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("message_id", String(32), ForeignKey("messages.id", ondelete="CASCADE"),
           nullable=False, index=True),
    Column("address", String(998), nullable=False),
    Column("status", String(16), nullable=False),  # model.RecipientStatus
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_reply", Text, nullable=False, default=""),
    Column("last_attempt_at", UtcDateTime, nullable=True),
)

destinations = Table(
    "destinations",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("up", Boolean, nullable=False, default=True),
    Column("failures", Integer, nullable=False, default=0),  # consecutive site failures
    Column("retry_at", UtcDateTime, nullable=True),  # next probe while down
    Column("last_error", Text, nullable=False, default=""),
    Column("updated_at", UtcDateTime, nullable=False),
)

delivery_log = Table(
    "delivery_log",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("message_id", String(32), nullable=False, index=True),
    Column("recipient", String(998), nullable=False),
    Column("at", UtcDateTime, nullable=False, index=True),
    Column("outcome", String(16), nullable=False),  # model.Outcome, or "expired"
    Column("reply", Text, nullable=False, default=""),
    Column("remote_host", String(255), nullable=False, default=""),
)
