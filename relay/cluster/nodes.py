"""This node's place in the cluster: its id, its heartbeat, its peers.

Owns what one `relay serve` tells the others through the `nodes` table:
who it is (`Node`: the lease owner string `hostname/pid/random`), that it is
alive (a heartbeat every third of `queue.lease`, which renews every lease
it holds in one row), which earlier runs of this node left deliveries
behind (returned at start-up), and which nodes it hears of (their names and
addresses go to loop avoidance). Refuses to touch messages itself: the
queue (`relay.queue.nodes`, `writes.py`) does, in the writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from relay.core.clock import Clock
from relay.queue.nodes import Node, NodeView
from relay.queue.store import Store

log = logging.getLogger("relay.cluster.nodes")

BEATS_PER_LEASE = 3  # a node renews three times per lease: two beats may be late

Peers = Callable[[set[str], set[str]], None]


def this_node(hostname: str, addresses: tuple[str, ...], started_at: datetime) -> Node:
    """This process as a node: a fresh id on every start (so a restarted node
    never mistakes the leases of its previous run for its own)."""
    pid = os.getpid()
    return Node(f"{hostname}/{pid}/{secrets.token_hex(3)}", hostname, pid, started_at,
                addresses)


def predecessors(node: Node, seen: list[NodeView], now: datetime) -> list[str]:
    """Earlier runs of this node on this host, whose deliveries it may take back
    at once instead of after their lease: rows with our hostname that are not
    us, whose heartbeat stopped or whose process is gone. Also the bare
    hostname, the lease owner of relays before the node registry."""
    gone = [node.hostname]
    for other in seen:
        if other.hostname != node.hostname or other.id == node.id:
            continue
        if other.alive_until < now or other.pid == node.pid or not _running(other.pid):
            gone.append(other.id)
    return gone


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process
    return True


class Heartbeat:
    """Beat until stopped; hand each beat's peers to `on_peers`."""

    def __init__(self, store: Store, clock: Clock, node: Node, *, lease: float,
                 retention: float, on_peers: Peers | None = None) -> None:
        self._store = store
        self._clock = clock
        self.node = node
        self.lease = lease
        self.retention = retention
        self._on_peers = on_peers
        self._stop = asyncio.Event()

    @property
    def interval(self) -> float:
        return self.lease / BEATS_PER_LEASE

    async def start(self) -> int:
        """The first beat, then the deliveries earlier runs of this node left
        active are returned to the queue; how many."""
        await self.beat()
        now = self._clock.now()
        queue = self._store.queue
        seen = await self._store.read(queue.nodes, now - timedelta(seconds=self.retention))
        gone = predecessors(self.node, seen, now)
        return await self._store.call(queue.recover, gone, now)

    async def beat(self) -> None:
        now = self._clock.now()
        queue = self._store.queue
        await self._store.call(queue.heartbeat, self.node, now,
                               now + timedelta(seconds=self.lease),
                               now - timedelta(seconds=self.retention))
        if self._on_peers is not None:
            names, addresses = await self._store.read(queue.peers, now, (self.node.id,))
            self._on_peers(names, addresses)

    async def run(self) -> None:
        """Beat every `interval` until `stop()`; a failed beat is logged and tried
        again at the next one (our leases hold for two more)."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            if self._stop.is_set():
                break
            try:
                await self.beat()
            except Exception as exc:  # the queue is down: said once per beat
                log.warning("node heartbeat failed: %s", exc)

    async def stop(self) -> None:
        """Stop beating and say so: leases still held may be taken over at once."""
        self._stop.set()
        with contextlib.suppress(Exception):
            await self._store.call(self._store.queue.node_stopped, self.node.id,
                                   self._clock.now())
