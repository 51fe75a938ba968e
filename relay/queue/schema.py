"""Tables of the queue, in portable SQLAlchemy Core (SQLite and PostgreSQL).

Owns table, index and trigger definitions only; the queue's parts (`writes.py`,
`commands.py`, `destinations.py`, `views.py`) read and write them, and
`migrations/` carries every change to them.

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
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import DDL

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
    # SPF result at MAIL FROM (relay.smtp.spf.RESULTS); NULL: not evaluated (SPF off,
    # a DSN of ours, a row older than migration 0009)
    Column("spf", String(16), nullable=True),
    # Scheduling: see model.MessageState. next_attempt_at is NULL while the
    # message waits on its destination being down (parked).
    Column("state", String(16), nullable=False),
    Column("next_attempt_at", UtcDateTime, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=False, default=""),
    Column("lease_owner", String(255), nullable=True),
    Column("lease_expires_at", UtcDateTime, nullable=True),
    Column("delay_warned", Boolean, nullable=False, default=False),
    # RFC 3461 RET (FULL/HDRS) and ENVID (xtext as given); NULL: not given
    Column("dsn_ret", String(4), nullable=True),
    Column("dsn_envid", String(100), nullable=True),
    Index("ix_messages_due", "state", "next_attempt_at"),
    # the delay-warning sweep reads only messages not yet warned
    Index("ix_messages_unwarned", "delay_warned", "received_at"),
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
    # RFC 3461 NOTIFY (words joined by ",") and ORCPT (as given); NULL: not given
    Column("notify", String(32), nullable=True),
    Column("orcpt", String(500), nullable=True),
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
    Column("down_since", UtcDateTime, nullable=True),  # when it went down; NULL while up
)

delivery_log = Table(
    "delivery_log",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("message_id", String(32), nullable=False, index=True),
    Column("recipient", String(998), nullable=False),
    Column("at", UtcDateTime, nullable=False, index=True),
    Column("outcome", String(16), nullable=False),  # model.Outcome
    Column("reply", Text, nullable=False, default=""),
    Column("remote_host", String(255), nullable=False, default=""),
)

# What next hops taught about addresses (SPEC "Knowing recipients"), shared
# by every node on the queue. `key` is `relay.core.recipients.recipient_key`;
# expiry is judged when read, from `last_seen_at` and the domain's TTLs of the
# moment (so a changed TTL applies at once). `last_seen_at` is also what the
# accept side's incremental refresh reads from, hence its index.
known_recipients = Table(
    "known_recipients",
    metadata,
    Column("key", String(998), primary_key=True),
    Column("address", String(998), nullable=False),  # as last seen
    Column("domain", String(255), nullable=False, index=True),
    Column("state", String(16), nullable=False),  # recipients.KnownState
    Column("source", String(16), nullable=False),  # recipients.Source
    Column("learned_at", UtcDateTime, nullable=False),
    Column("last_seen_at", UtcDateTime, nullable=False, index=True),
)


# Every `relay serve` that shares this queue, by its lease owner string: the
# heartbeat keeps `last_seen_at` and `alive_until` (last_seen_at + queue.lease)
# fresh; leases of a node alive until later are not taken over. `addresses`:
# its listen IPs and node.addresses, space separated (loop avoidance).
nodes = Table(
    "nodes",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("last_seen_at", UtcDateTime, nullable=False, index=True),
    Column("alive_until", UtcDateTime, nullable=False),
    Column("addresses", Text, nullable=False, default=""),
)

# -- queue depth, kept by triggers ---------------------------------------------
#
# `queue_counts` holds how many `messages` rows there are per destination and
# state, kept exact by triggers on `messages` (insert, delete, update of
# state or destination), so every writer, present or future, keeps it right
# and a scrape reads a few rows instead of scanning the queue. Sum `n` over
# `shard`: on PostgreSQL each writing backend counts into its own shard (its
# pid), so concurrent transactions never wait on, or deadlock over, a shared
# counter row; a shard's `n` may be negative, only the sum means anything.
# `Queue.compact_counts()` folds shards into shard 0. SQLite has one writer at
# a time and uses shard 0 only.
#
# The trigger DDL below serves `metadata.create_all`; migration 0002 keeps its
# own frozen copy, and tests/component/test_migrations.py checks the two agree.
# A future SQLite "batch" migration that rebuilds `messages` drops its
# triggers with the old table: it must create them again.

queue_counts = Table(
    "queue_counts",
    metadata,
    Column("destination", String(255), primary_key=True),
    Column("state", String(16), primary_key=True),
    Column("shard", Integer, primary_key=True, autoincrement=False),
    Column("n", BigInteger, nullable=False),
)

SQLITE_COUNT_TRIGGERS = (
    """CREATE TRIGGER trg_messages_count_insert AFTER INSERT ON messages
BEGIN
    INSERT INTO queue_counts (destination, state, shard, n)
    VALUES (NEW.destination, NEW.state, 0, 1)
    ON CONFLICT (destination, state, shard) DO UPDATE SET n = n + 1;
END""",
    """CREATE TRIGGER trg_messages_count_delete AFTER DELETE ON messages
BEGIN
    INSERT INTO queue_counts (destination, state, shard, n)
    VALUES (OLD.destination, OLD.state, 0, -1)
    ON CONFLICT (destination, state, shard) DO UPDATE SET n = n - 1;
    DELETE FROM queue_counts
    WHERE destination = OLD.destination AND state = OLD.state AND shard = 0 AND n = 0;
END""",
    """CREATE TRIGGER trg_messages_count_update AFTER UPDATE OF state, destination ON messages
WHEN OLD.state IS NOT NEW.state OR OLD.destination IS NOT NEW.destination
BEGIN
    INSERT INTO queue_counts (destination, state, shard, n)
    VALUES (OLD.destination, OLD.state, 0, -1)
    ON CONFLICT (destination, state, shard) DO UPDATE SET n = n - 1;
    DELETE FROM queue_counts
    WHERE destination = OLD.destination AND state = OLD.state AND shard = 0 AND n = 0;
    INSERT INTO queue_counts (destination, state, shard, n)
    VALUES (NEW.destination, NEW.state, 0, 1)
    ON CONFLICT (destination, state, shard) DO UPDATE SET n = n + 1;
END""",
)

POSTGRESQL_COUNT_TRIGGERS = (
    """CREATE FUNCTION queue_counts_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO queue_counts AS c (destination, state, shard, n)
        VALUES (OLD.destination, OLD.state, pg_backend_pid(), -1)
        ON CONFLICT (destination, state, shard) DO UPDATE SET n = c.n - 1;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO queue_counts AS c (destination, state, shard, n)
        VALUES (NEW.destination, NEW.state, pg_backend_pid(), 1)
        ON CONFLICT (destination, state, shard) DO UPDATE SET n = c.n + 1;
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER trg_messages_count_insert_delete AFTER INSERT OR DELETE ON messages
FOR EACH ROW EXECUTE FUNCTION queue_counts_track()""",
    """CREATE TRIGGER trg_messages_count_update AFTER UPDATE OF state, destination ON messages
FOR EACH ROW
WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.destination IS DISTINCT FROM NEW.destination)
EXECUTE FUNCTION queue_counts_track()""",
)

for _statement in SQLITE_COUNT_TRIGGERS:
    event.listen(metadata, "after_create", DDL(_statement).execute_if(dialect="sqlite"))
for _statement in POSTGRESQL_COUNT_TRIGGERS:
    event.listen(metadata, "after_create", DDL(_statement).execute_if(dialect="postgresql"))
event.listen(
    metadata,
    "after_drop",
    DDL("DROP FUNCTION IF EXISTS queue_counts_track()").execute_if(dialect="postgresql"),
)
