"""Known recipients: what next hops taught about addresses (verify = "learned").

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "known_recipients",
        sa.Column("key", sa.String(998), nullable=False),
        sa.Column("address", sa.String(998), nullable=False),
        sa.Column("domain", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("learned_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_known_recipients"),
    )
    op.create_index("ix_known_recipients_domain", "known_recipients", ["domain"])
    op.create_index("ix_known_recipients_last_seen_at", "known_recipients", ["last_seen_at"])


def downgrade() -> None:
    op.drop_index("ix_known_recipients_last_seen_at", table_name="known_recipients")
    op.drop_index("ix_known_recipients_domain", table_name="known_recipients")
    op.drop_table("known_recipients")
