"""When each down destination went down: for `relay status` and the mail log's
`destination D is up again after <duration>`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # `destinations` has no triggers: a plain ADD COLUMN on every backend.
    op.add_column("destinations", sa.Column("down_since", sa.DateTime(), nullable=True))
    # A destination already down when this runs: its last failure is the best
    # lower bound there is.
    destinations = sa.table("destinations", sa.column("up", sa.Boolean),
                            sa.column("updated_at", sa.DateTime),
                            sa.column("down_since", sa.DateTime))
    op.execute(
        destinations.update()
        .where(destinations.c.up.is_(False))
        .values(down_since=destinations.c.updated_at)
    )


def downgrade() -> None:
    op.drop_column("destinations", "down_since")
