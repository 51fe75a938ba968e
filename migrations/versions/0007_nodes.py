"""The node registry: every `relay serve` sharing the queue, with its heartbeat.

A node's leases are not taken over while its `alive_until` (its last
heartbeat plus its `queue.lease`) lies ahead; `relay nodes` lists the rows,
loop avoidance reads the hostnames and addresses of the nodes alive.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.Column("alive_until", sa.DateTime(), nullable=False),
        sa.Column("addresses", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
    )
    op.create_index(op.f("ix_nodes_last_seen_at"), "nodes", ["last_seen_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_nodes_last_seen_at"), table_name="nodes")
    op.drop_table("nodes")
