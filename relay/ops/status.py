"""`relay status`: one view of a running installation, read from its queue database.

Owns what the view holds (SPEC Part 2 "Operating it day to day"): the queue
(where it is, its schema revision, messages by state, the oldest one's age),
every destination that has queued mail or is down (up or not, since when, its
last reply, its next probe, its messages) and the nodes sharing the queue;
and its two forms, a JSON object and a short table read at a glance. Refuses
to write anything and to ask a running relay: everything here is in the
database, so it reads the same from any host that reaches it. `nodes` is the
node registry as `relay nodes --json` shows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from relay.core.clock import iso
from relay.core.destination import State
from relay.core.maillog import span
from relay.core.model import MessageState

if TYPE_CHECKING:
    from relay.queue.nodes import NodeView
    from relay.queue.views import Views

LAST_REPLY_WIDTH = 60  # the table cuts longer replies; JSON has them whole
TABLE_ROWS = 20  # destinations in the text form (down ones first); JSON has every one


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    destination: str
    state: State
    since: datetime | None  # when it went down; None while up
    last_reply: str | None
    next_probe_at: datetime | None  # None while up, or while its probe runs
    messages: int

    @property
    def up(self) -> bool:
        return self.state is State.UP


@dataclass(frozen=True, slots=True)
class Status:
    url: str
    revision: str | None
    by_state: Mapping[str, int]
    oldest_received_at: datetime | None
    now: datetime
    destinations: Sequence[DestinationStatus]
    nodes: Sequence[Mapping[str, Any]] = ()
    nodes_up: int = 0  # of `nodes`, those seen within one lease

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    @property
    def oldest_age_seconds(self) -> int:
        if self.oldest_received_at is None:
            return 0
        return max(0, int((self.now - self.oldest_received_at).total_seconds()))


def node_json(node: NodeView) -> dict[str, Any]:
    """One node as `relay nodes --json` and `relay status --json` show it (SPEC)."""
    return {"id": node.id, "hostname": node.hostname, "pid": node.pid,
            "started_at": iso(node.started_at), "last_seen_at": iso(node.last_seen_at),
            "active_deliveries": node.active_deliveries}


def gather(queue: Views, url: str, revision: str | None, now: datetime,
           nodes: Sequence[NodeView] = ()) -> Status:
    """Read the status through the queue's views (a few small reads, none a scan)."""
    by_destination = queue.counts_by_destination()
    rows = {row.name: row for row in queue.destination_rows()}
    names = {name for name, row in rows.items() if not row.up} | set(by_destination)
    found = []
    for name in names:
        row = rows.get(name)
        state = State.of(None, None) if row is None else State.of(row.up, row.retry_at)
        down = state is not State.UP
        found.append(DestinationStatus(
            destination=name,
            state=state,
            since=row.down_since if row is not None and down else None,
            last_reply=(row.last_error or None) if row is not None and down else None,
            next_probe_at=row.retry_at if row is not None and down else None,
            messages=sum(by_destination.get(name, {}).values()),
        ))
    found.sort(key=lambda d: (d.up, -d.messages, d.destination))
    counts = queue.counts()
    by_state = {s.value: counts.get(s.value, 0) for s in MessageState}
    return Status(url, revision, by_state, queue.oldest_received_at(), now, found,
                  [node_json(n) for n in nodes],
                  sum(1 for n in nodes if n.alive_until >= now))


def as_json(status: Status) -> dict[str, Any]:
    """SPEC's keys; each destination also carries its `state` (up, down, probing)."""
    return {
        "queue": {
            "url": status.url,
            "revision": status.revision,
            "by_state": dict(status.by_state),
            "total": status.total,
            "oldest_age_seconds": status.oldest_age_seconds,
        },
        "destinations": [
            {
                "destination": d.destination,
                "up": d.up,
                "state": d.state.value,
                "since": iso(d.since),
                "last_reply": d.last_reply,
                "next_probe_at": iso(d.next_probe_at),
                "messages": d.messages,
            }
            for d in status.destinations
        ],
        "nodes": [dict(n) for n in status.nodes],
    }


def as_text(status: Status) -> str:
    """A few lines: where the queue is, how much waits, which destinations are down."""
    states = ", ".join(f"{n} {state}" for state, n in status.by_state.items())
    oldest = (f"; oldest {span(status.oldest_age_seconds)}"
              if status.oldest_received_at is not None else "")
    lines = [
        f"queue:        {status.url} (revision {status.revision or 'unknown'})",
        f"messages:     {status.total} ({states}){oldest}",
    ]
    down = sum(1 for d in status.destinations if not d.up)
    if not status.destinations:
        lines.append("destinations: none with mail, none down")
    else:
        lines.append(f"destinations: {len(status.destinations)} with mail or down, {down} down")
        lines.append(_table(status, status.destinations[:TABLE_ROWS]))
        if (more := len(status.destinations) - TABLE_ROWS) > 0:
            lines.append(f"  ... and {more} more (relay status --json lists every one)")
    lines.append("nodes:        none seen lately" if not status.nodes else
                 f"nodes:        {status.nodes_up} up of {len(status.nodes)} seen lately "
                 "(relay nodes lists them)")
    return "\n".join(lines)


def _table(status: Status, shown: Sequence[DestinationStatus]) -> str:
    header = ("DESTINATION", "STATE", "DOWN FOR", "NEXT PROBE", "MESSAGES", "LAST REPLY")
    rows = [header]
    for d in shown:
        rows.append((
            d.destination,
            d.state.value,
            "-" if d.since is None else span((status.now - d.since).total_seconds()),
            _next_probe(d, status.now),
            str(d.messages),
            _cut(d.last_reply or "-"),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    out = []
    for r in rows:
        cells = [r[i].rjust(w) if i == 4 else r[i].ljust(w) for i, w in enumerate(widths)]
        out.append(("  " + "  ".join(cells) + "  " + r[-1]).rstrip())
    return "\n".join(out)


def _next_probe(d: DestinationStatus, now: datetime) -> str:
    if d.up:
        return "-"
    if d.next_probe_at is None:
        return "running"  # PROBING: one parked message is being tried
    if d.next_probe_at <= now:
        return "due"
    return f"in {span((d.next_probe_at - now).total_seconds())}"


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= LAST_REPLY_WIDTH else text[:LAST_REPLY_WIDTH - 3] + "..."
