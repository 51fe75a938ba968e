"""The SPF result at MAIL FROM, kept with each message.

`messages.spf` holds one of pass, fail, softfail, neutral, none, temperror,
permerror; NULL where SPF was not evaluated (SPF off, our own DSNs, rows
older than this revision), which `bounces.send_to = "spf-pass"` counts as
`none`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN: a batch rebuild on SQLite would drop queue_counts' triggers.
    op.add_column("messages", sa.Column("spf", sa.String(16), nullable=True))


def downgrade() -> None:
    op.drop_column("messages", "spf")
