"""The queue as one object: its writing side, operator verbs and views together.

Owns nothing of its own: `Queue` composes `writes.Writes` (put, claim,
record with the lease checked, give back; the destinations' state through
`destinations.py`), `commands.Commands` (flush, hold, release, delete) and
`views.Views` (read-only), so callers hold one handle on one engine. Refuses
SQL of its own; the row types are in `rows.py`.
"""

from __future__ import annotations

from relay.queue.commands import Commands
from relay.queue.views import Views
from relay.queue.writes import Writes


class Queue(Writes, Commands, Views):
    """One engine, every part of the queue; writes go through the writer thread."""
