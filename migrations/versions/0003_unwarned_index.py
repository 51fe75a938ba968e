"""Index for the delay-warning sweep: messages not yet warned, by arrival.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain op.create_index, not batch mode: a SQLite batch rebuild of
    # `messages` would drop the queue_counts triggers of 0002.
    op.create_index("ix_messages_unwarned", "messages", ["delay_warned", "received_at"])
    messages = sa.table("messages", sa.column("sender"), sa.column("is_dsn"),
                        sa.column("delay_warned"))
    op.execute(
        messages.update()
        .where(sa.or_(messages.c.sender == "", messages.c.is_dsn.is_(True)))
        .values(delay_warned=True)
    )


def downgrade() -> None:
    op.drop_index("ix_messages_unwarned", table_name="messages")
