"""Destinations in A-label form: `bücher.test` rows become `xn--bcher-kva.test`.

Before this revision a recipient domain sent as a U-label (SMTPUTF8) was
queued under that spelling, so `--domain`, ETRN and `queue stats` saw one
domain under two names. Every `messages.destination` and `destinations.name`
that is not in A-label form (lower case, no final dot, IDNA 2008 with UTS #46
mapping) is rewritten to it. The `queue_counts` triggers of 0002 move the
counts along with each updated row; the old spelling's counter rows, which
then sum to zero, are removed. A `destinations` row whose A-label twin
already exists is dropped (it only remembers a down state; the next attempt
learns it again). Text that is no domain name is only lower-cased.

The conversion is a frozen copy (relay/core/address.py holds the current
one). Downgrade leaves the rows as they are: A-labels are valid there too.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import idna
import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

messages = sa.table("messages", sa.column("destination", sa.String))
destinations = sa.table("destinations", sa.column("name", sa.String))
queue_counts = sa.table("queue_counts", sa.column("destination", sa.String))


def a_label(name: str) -> str:
    text = name.strip()
    if text.startswith("["):
        return text  # an address literal stays as it is
    if text.endswith("."):
        text = text[:-1]
    try:
        return idna.encode(text, uts46=True, transitional=False).decode("ascii").lower()
    except UnicodeError:
        return text.lower()


def upgrade() -> None:
    conn = op.get_bind()
    for (old,) in conn.execute(sa.select(messages.c.destination).distinct()).all():
        new = a_label(old)
        if new != old:
            conn.execute(messages.update().where(messages.c.destination == old)
                         .values(destination=new))
            conn.execute(queue_counts.delete().where(queue_counts.c.destination == old))
    names = {name for (name,) in conn.execute(sa.select(destinations.c.name)).all()}
    for old in sorted(names):
        new = a_label(old)
        if new == old:
            continue
        if new in names:
            conn.execute(destinations.delete().where(destinations.c.name == old))
        else:
            conn.execute(destinations.update().where(destinations.c.name == old)
                         .values(name=new))
            names.add(new)


def downgrade() -> None:
    pass
