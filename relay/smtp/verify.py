"""The accept side's copy of known recipients, refreshed from the queue.

Owns the in-memory map RCPT TO consults when a domain has `verify =
"learned"` or `"callout"` (so a check costs a dictionary lookup, never a database round
trip): a full load at start, then every few seconds the rows seen since the
newest one it has (with a few seconds' overlap for transactions that commit
late) plus the row count, which tells that rows were added that the
incremental read missed, or forgotten: then the copy is loaded whole again,
as it is every few minutes anyway (a node whose clock lags stamps rows
"in the past", where an incremental read does not look). What this node's
own deliveries taught, or a callout's verdict, is added at once. Refuses to
judge replies or to write: rules are `relay.core.recipients`', storage is
the queue's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta

from relay.core.recipients import KnownRecipient, KnownState, Learned, Ttl

log = logging.getLogger("relay.smtp.verify")

REFRESH_INTERVAL = 2.0  # seconds: how soon another node's (or the CLI's) change is seen
OVERLAP = timedelta(seconds=5)  # re-read this much before the newest row we have
FULL_INTERVAL = 300.0  # seconds between whole loads

Read = Callable[[datetime | None], Awaitable[tuple[list[KnownRecipient], int]]]


class KnownRecipients:
    """Known-valid and known-invalid addresses by key, with when last seen."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[KnownState, datetime]] = {}
        self._newest: datetime | None = None
        self._loaded = False
        self._full_at: float | None = None  # monotonic time of the last whole load
        self.active = False  # some domain has verify on: worth refreshing

    def state(self, key: str, ttl: Ttl, now: datetime) -> KnownState | None:
        """What is known of `key` now; None when nothing is, or it expired."""
        entry = self._known.get(key)
        if entry is None or ttl.expired(entry[0], entry[1], now):
            return None
        return entry[0]

    def __len__(self) -> int:
        return len(self._known)

    def taught(self, learned: Iterable[Learned], at: datetime, by: str = "a delivery") -> None:
        """What this node's own delivery (or callout) taught, once the queue stored it."""
        count = 0
        for item in learned:
            self._known[item.key] = (item.state, at)
            count += 1
        if count:
            log.debug("known recipients: %d taught by %s, %d known", count, by, len(self))

    def apply(self, rows: Sequence[KnownRecipient], total: int, *, full: bool) -> int | None:
        """Take rows read from the queue: how many entries changed, or None
        when the copy no longer has as many rows as the table (something was
        forgotten): then load it whole."""
        before = self._known
        if full:
            self._known = {}
            self._newest = None
        changed = 0
        for row in rows:
            entry = (row.state, row.last_seen_at)
            if before.get(row.key) != entry:
                changed += 1
            self._known[row.key] = entry
            if self._newest is None or row.last_seen_at > self._newest:
                self._newest = row.last_seen_at
        self._loaded = True
        if full:
            changed += sum(key not in self._known for key in before)
        return changed if len(self._known) == total else None

    async def refresh(self, read: Read, monotonic: float = 0.0) -> None:
        """One refresh: the changes, or everything when the counts disagree or
        the last whole load is `FULL_INTERVAL` old (`monotonic`: the time now)."""
        whole = (not self._loaded or self._newest is None or self._full_at is None
                 or monotonic - self._full_at >= FULL_INTERVAL)
        since = None if whole or self._newest is None else self._newest - OVERLAP
        rows, total = await read(since)
        changed = self.apply(rows, total, full=since is None)
        if changed is None and since is not None:
            rows, total = await read(None)
            changed = self.apply(rows, total, full=True)
            since = None
        if since is None:
            self._full_at = monotonic
        if changed:
            log.debug("known recipients: %d changed in the queue, %d known", changed, len(self))

    async def run(self, read: Read, interval: float = REFRESH_INTERVAL) -> None:
        """Refresh every `interval` seconds while some domain verifies; a
        failing read is logged and tried again at the next tick."""
        while True:
            if self.active:
                try:
                    await self.refresh(read, time.monotonic())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a database gone for a while: keep what we know
                    log.warning("known recipients not refreshed: %s", exc)
            else:
                self._loaded = False  # turned on again later: load it whole
            await asyncio.sleep(interval)
