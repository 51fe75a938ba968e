"""The `nodes` table: every `relay serve` sharing this queue, and its heartbeat.

Owns the node rows (one per running process, keyed by its lease owner
string), the heartbeat that keeps a node's leases its own (`alive_until`),
and what the cluster reads of it: the nodes seen lately (`relay nodes`),
how many are up (`relay_nodes_up`), the names and addresses that loop
avoidance counts as this node. Refuses to decide when to beat or what a
lapsed lease means for a message: the scheduler and `writes.py` do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, exists, func, insert, not_, select, update

from relay.core.model import MessageState
from relay.queue.schema import messages, nodes
from relay.queue.sql import QueueBase


@dataclass(frozen=True, slots=True)
class Node:
    """One `relay serve` as it announces itself."""

    id: str  # its lease owner string: hostname/pid/random
    hostname: str  # node.hostname
    pid: int
    started_at: datetime
    addresses: tuple[str, ...] = ()  # listen IPs and node.addresses


@dataclass(frozen=True, slots=True)
class NodeView:
    """A node as `relay nodes` shows it."""

    id: str
    hostname: str
    pid: int
    started_at: datetime
    last_seen_at: datetime
    alive_until: datetime
    addresses: tuple[str, ...]
    active_deliveries: int


def lapsed(now: datetime) -> ColumnElement[bool]:
    """Active messages whose lease ran out and whose owner no longer beats:
    another node may take them over (an owner that is no node, as the
    operator's verbs are, only has the lease it claimed)."""
    return and_(
        messages.c.state == MessageState.ACTIVE.value,
        messages.c.lease_expires_at < now,
        not_(exists().where(nodes.c.id == messages.c.lease_owner, nodes.c.alive_until >= now)),
    )


class NodeTable(QueueBase):
    def heartbeat(self, node: Node, now: datetime, alive_until: datetime,
                  forget_before: datetime | None = None) -> None:
        """This node is alive until `alive_until`: its leases are renewed, all
        of them in this one row. Rows of nodes last seen before
        `forget_before` are removed."""
        values = {"hostname": node.hostname, "pid": node.pid, "started_at": node.started_at,
                  "last_seen_at": now, "alive_until": alive_until,
                  "addresses": " ".join(node.addresses)}
        with self.engine.begin() as conn:
            found = conn.execute(update(nodes).where(nodes.c.id == node.id).values(**values))
            if found.rowcount == 0:
                conn.execute(insert(nodes).values(id=node.id, **values))
            if forget_before is not None:
                conn.execute(delete(nodes).where(nodes.c.last_seen_at < forget_before))

    def node_stopped(self, node_id: str, now: datetime) -> None:
        """A clean stop: what the node still leases may be taken over at once."""
        with self.engine.begin() as conn:
            conn.execute(update(nodes).where(nodes.c.id == node_id)
                         .values(last_seen_at=now, alive_until=now))

    def nodes(self, since: datetime) -> list[NodeView]:
        """Nodes seen since `since`, oldest start first, each with the messages it
        is delivering now."""
        active = (
            select(messages.c.lease_owner, func.count().label("n"))
            .where(messages.c.state == MessageState.ACTIVE.value)
            .group_by(messages.c.lease_owner)
            .subquery()
        )
        with self._reading() as conn:
            rows = conn.execute(
                select(nodes, func.coalesce(active.c.n, 0).label("active"))
                .outerjoin(active, active.c.lease_owner == nodes.c.id)
                .where(nodes.c.last_seen_at >= since)
                .order_by(nodes.c.started_at, nodes.c.id)
            ).all()
        return [
            NodeView(r.id, r.hostname, r.pid, r.started_at, r.last_seen_at, r.alive_until,
                     tuple(r.addresses.split()), int(r.active))
            for r in rows
        ]

    def nodes_up(self, now: datetime) -> int:
        """Nodes whose heartbeat holds now (seen within their lease)."""
        with self._reading() as conn:
            return int(conn.execute(
                select(func.count()).select_from(nodes).where(nodes.c.alive_until >= now)
            ).scalar_one())

    def peers(self, now: datetime, exclude: Iterable[str] = ()) -> tuple[set[str], set[str]]:
        """Hostnames and addresses of the nodes alive now (but `exclude`d ids):
        loop avoidance counts them as this node."""
        with self._reading() as conn:
            rows = conn.execute(
                select(nodes.c.hostname, nodes.c.addresses)
                .where(nodes.c.alive_until >= now, nodes.c.id.not_in(tuple(exclude)))
            ).all()
        return {r.hostname for r in rows}, {a for r in rows for a in r.addresses.split()}
