"""Initial queue schema: bodies, messages, recipients, destinations, delivery log.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bodies",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bodies")),
    )
    op.create_table(
        "delivery_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("message_id", sa.String(length=32), nullable=False),
        sa.Column("recipient", sa.String(length=998), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reply", sa.Text(), nullable=False),
        sa.Column("remote_host", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_log")),
    )
    with op.batch_alter_table("delivery_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_delivery_log_at"), ["at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_delivery_log_message_id"), ["message_id"], unique=False
        )

    op.create_table(
        "destinations",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("up", sa.Boolean(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("retry_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_destinations")),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("body_id", sa.String(length=32), nullable=False),
        sa.Column("destination", sa.String(length=255), nullable=False),
        sa.Column("sender", sa.String(length=998), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("client_address", sa.String(length=64), nullable=False),
        sa.Column("client_helo", sa.String(length=255), nullable=False),
        sa.Column("smtputf8", sa.Boolean(), nullable=False),
        sa.Column("eightbit", sa.Boolean(), nullable=False),
        sa.Column("is_dsn", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("delay_warned", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["body_id"], ["bodies.id"], name=op.f("fk_messages_body_id_bodies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_messages_body_id"), ["body_id"], unique=False)
        batch_op.create_index("ix_messages_destination", ["destination", "state"], unique=False)
        batch_op.create_index("ix_messages_due", ["state", "next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_messages_received_at"), ["received_at"], unique=False)

    op.create_table(
        "recipients",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("message_id", sa.String(length=32), nullable=False),
        sa.Column("address", sa.String(length=998), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_reply", sa.Text(), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_recipients_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recipients")),
    )
    with op.batch_alter_table("recipients", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_recipients_message_id"), ["message_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("recipients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_recipients_message_id"))

    op.drop_table("recipients")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_messages_received_at"))
        batch_op.drop_index("ix_messages_due")
        batch_op.drop_index("ix_messages_destination")
        batch_op.drop_index(batch_op.f("ix_messages_body_id"))

    op.drop_table("messages")
    op.drop_table("destinations")
    with op.batch_alter_table("delivery_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_log_message_id"))
        batch_op.drop_index(batch_op.f("ix_delivery_log_at"))

    op.drop_table("delivery_log")
    op.drop_table("bodies")
