"""The SPF result at MAIL FROM, kept with each message.

`messages.spf` holds one of pass, fail, softfail, neutral, none, temperror,
permerror; NULL where SPF was not evaluated (SPF off, our own DSNs, rows
older than this revision), which `bounces.send_to = "spf-pass"` counts as
`none`.

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
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("spf", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("spf")
