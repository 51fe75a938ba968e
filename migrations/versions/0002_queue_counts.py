"""Queue depth table `queue_counts`, kept exact by triggers on `messages`.

Scrapes read a few counter rows instead of scanning the queue. The triggers
fire on insert, delete and on updates of `state` or `destination`, so every
writer (the relay, the CLI, future code) keeps the counts right. On
PostgreSQL each backend counts into its own shard (its pid): concurrent
writers never wait on, or deadlock over, a shared counter row.

The triggers are created before the backfill, in the same transaction: on
PostgreSQL, CREATE TRIGGER holds a SHARE ROW EXCLUSIVE lock on `messages`
until commit, so no writer slips between the backfill and the triggers; on
SQLite the migration holds the write lock from BEGIN IMMEDIATE.

The DDL is a frozen copy (relay/schema.py holds the current one for
`metadata.create_all`; a test checks they agree). A later SQLite batch
migration that rebuilds `messages` drops these triggers and must recreate them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQLITE = (
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

POSTGRESQL = (
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

BACKFILL = """INSERT INTO queue_counts (destination, state, shard, n)
SELECT destination, state, 0, count(*) FROM messages GROUP BY destination, state"""


def _dialect() -> str:
    return op.get_bind().dialect.name


def upgrade() -> None:
    op.create_table(
        "queue_counts",
        sa.Column("destination", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("destination", "state", "shard", name=op.f("pk_queue_counts")),
    )
    dialect = _dialect()
    if dialect == "sqlite":
        statements: tuple[str, ...] = SQLITE
    elif dialect == "postgresql":
        statements = POSTGRESQL
    else:  # relay.queue.db refuses other backends; fail loudly rather than count wrong
        raise NotImplementedError(f"queue_counts triggers for {dialect}")
    for statement in statements:
        op.execute(statement)
    op.execute(BACKFILL)


def downgrade() -> None:
    dialect = _dialect()
    if dialect == "sqlite":
        for name in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_messages_count_{name}")
    elif dialect == "postgresql":
        for name in ("insert_delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_messages_count_{name} ON messages")
        op.execute("DROP FUNCTION IF EXISTS queue_counts_track()")
    op.drop_table("queue_counts")
