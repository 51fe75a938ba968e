"""RFC 3461 DSN parameters: RET and ENVID per message, NOTIFY and ORCPT per recipient.

All four are nullable: rows from before this revision (and mail that gave
none) mean the RFC defaults.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN on every backend: a batch (copy-and-move) on SQLite
    # would drop the triggers on `messages` that keep `queue_counts`.
    op.add_column("messages", sa.Column("dsn_ret", sa.String(4), nullable=True))
    op.add_column("messages", sa.Column("dsn_envid", sa.String(100), nullable=True))
    op.add_column("recipients", sa.Column("notify", sa.String(32), nullable=True))
    op.add_column("recipients", sa.Column("orcpt", sa.String(500), nullable=True))


def downgrade() -> None:
    op.drop_column("recipients", "orcpt")
    op.drop_column("recipients", "notify")
    op.drop_column("messages", "dsn_envid")
    op.drop_column("messages", "dsn_ret")
