"""The queue manager: picks due work, runs deliveries, records what happened.

Owns the delivery loop (Postfix's qmgr): wake on new mail, an operator's
flush, a finished delivery or a poll tick; claim due messages within the
global and per-destination concurrency limits; probe dead destinations once
per backoff step; bounce what expired; hand every attempt's decision to the
queue. Refuses to speak SMTP or DNS itself (transport, resolver) and to write
SQL (queue, through the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from relay import maillog
from relay.clock import Clock
from relay.metrics import Metrics
from relay.model import DeliveryReport, OutboundMessage, Outcome
from relay.outcomes import Decision, Rules, decide
from relay.queue import Claimed, Queue, QueueError, Selector
from relay.resolver import NoRoute, Resolver
from relay.store import Store
from relay.transport import Transport

log = logging.getLogger("relay.scheduler")


@dataclass(frozen=True, slots=True)
class Limits:
    concurrency: int
    per_destination: int
    poll_interval: float = 0.5  # how soon another process's flush is seen
    lease: float = 3600.0  # a claimed message returns to the queue after this
    expiry_interval: float = 60.0
    prune_interval: float = 3600.0
    log_retention: float = 7 * 86400.0


class Scheduler:
    def __init__(
        self,
        *,
        store: Store,
        resolver: Resolver,
        transport: Transport,
        rules: Rules,
        limits: Limits,
        clock: Clock,
        owner: str,
        next_hops: dict[str, str],
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._queue: Queue = store.queue
        self._resolver = resolver
        self._transport = transport
        self._rules = rules
        self._limits = limits
        self._clock = clock
        self._owner = owner
        self._next_hops = next_hops
        self._metrics = metrics or Metrics()
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._per_destination: Counter[str] = Counter()
        self._stopping = False
        self._last_expiry = 0.0
        self._last_prune = 0.0

    def wake(self) -> None:
        """New mail or a flush: look for due work now instead of at the next tick."""
        self._wake.set()

    async def flush_domain(self, domain: str) -> int:
        """ETRN and operator flush: everything waiting for `domain` is due now."""
        count = await self._store.call(
            self._queue.flush, Selector(domain=domain), self._clock.now()
        )
        self.wake()
        return count

    async def run(self) -> None:
        """Loop until stop(); in-flight deliveries are awaited by stop()."""
        now = self._clock.now()
        recovered = await self._store.call(self._queue.recover, self._owner, now)
        if recovered:
            log.info("returned %d interrupted deliveries to the queue", recovered)
        while not self._stopping:
            try:
                await self._pass()
            except QueueError as exc:
                log.error("queue unavailable: %s", exc)
            except Exception:
                log.exception("scheduler pass failed")
            if self._stopping:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._limits.poll_interval)

    async def stop(self, grace: float) -> None:
        """Stop claiming; let deliveries finish for `grace` seconds, then put them back."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                await self._store.call(self._queue.recover, self._owner, self._clock.now())

    async def _pass(self) -> None:
        now = self._clock.now()
        mono = time.monotonic()
        if mono - self._last_expiry >= self._limits.expiry_interval:
            self._last_expiry = mono
            await self._expire(now)
            await self._store.call(self._queue.compact_counts)
        if mono - self._last_prune >= self._limits.prune_interval:
            self._last_prune = mono
            await self._store.call(
                self._queue.prune_log, now - timedelta(seconds=self._limits.log_retention)
            )

        stale = now - timedelta(seconds=self._limits.lease)
        for name in await self._store.call(self._queue.start_probes, now, stale):
            log.info("destination %s: probing after backoff", name)
        free = self._limits.concurrency - len(self._inflight)
        if free <= 0:
            return
        full = [d for d, n in self._per_destination.items() if n >= self._limits.per_destination]
        limit = min(free, self._limits.per_destination)
        claimed = await self._store.call(
            self._queue.claim_due, self._owner, now, limit, self._limits.lease, full
        )
        over = []
        for message in claimed:
            if self._per_destination[message.destination] >= self._limits.per_destination:
                over.append(message.id)
            else:
                self._start(message)
        if over:  # more due mail for a busy destination than it may take now
            await self._store.call(self._queue.unclaim, over, self._owner, now)

    def _start(self, message: Claimed) -> None:
        self._per_destination[message.destination] += 1
        task = asyncio.create_task(self._deliver(message), name=f"deliver-{message.id}")
        self._inflight[message.id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._inflight.pop(message.id, None)
            self._per_destination[message.destination] -= 1
            if self._per_destination[message.destination] <= 0:
                del self._per_destination[message.destination]
            self._wake.set()

        task.add_done_callback(done)

    async def _expire(self, now) -> None:  # type: ignore[no-untyped-def]
        cutoff = now - timedelta(seconds=self._rules.backoff.max_lifetime)
        expired = await self._store.call(
            self._queue.claim_expired, self._owner, now, cutoff, 500, self._limits.lease
        )
        for message in expired:
            original = await self._store.call(self._queue.body, message.body_id)
            decision = decide(
                self._rules, message, self._owner, now, report=None, original=original
            )
            await self._store.call(self._queue.record, decision.attempt)
            maillog.attempt_results(message, decision, now)
            self._count(decision, None)

    async def _deliver(self, message: Claimed) -> None:
        started = time.monotonic()
        now = self._clock.now()
        try:
            original = await self._store.call(self._queue.body, message.body_id)
            if self._rules.backoff.expired(message.received_at, now):
                report: DeliveryReport | NoRoute | None = None
            else:
                report = await self._attempt(message, original)
            now = self._clock.now()
            failures = 0
            if isinstance(report, NoRoute | DeliveryReport) and _site_failure(report):
                failures = await self._store.call(self._queue.failures, message.destination)
            decision = decide(
                self._rules,
                message,
                self._owner,
                now,
                report=report,
                original=original,
                destination_failures=failures,
            )
            await self._store.call(self._queue.record, decision.attempt)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: delivery attempt failed unexpectedly; will retry", message.id)
            retry = self._clock.now() + timedelta(seconds=self._rules.backoff.min_backoff)
            await self._store.call(self._queue.unclaim, [message.id], self._owner, retry)
            return
        duration = time.monotonic() - started
        maillog.attempt_results(message, decision, now, duration)
        self._count(decision, duration)
        if decision.destination_down:
            log.info("destination %s is down: %s", message.destination, decision.attempt.last_error)
        if any(outcome is Outcome.BOUNCED for _, outcome, _ in decision.results):
            self.wake()  # a DSN was queued

    def _count(self, decision: Decision, duration: float | None) -> None:
        for _, outcome, _ in decision.results:
            self._metrics.delivery(outcome)
        if duration is not None:
            self._metrics.observe_delivery(duration)
        if decision.attempt.destination is not None:
            dest = decision.attempt.destination
            self._metrics.destination(dest.name, dest.up)

    async def _attempt(self, message: Claimed, original: bytes) -> DeliveryReport | NoRoute:
        route = await self._resolver.route(
            message.destination, self._next_hops.get(message.destination, "")
        )
        if isinstance(route, NoRoute):
            return route
        outbound = OutboundMessage(
            queue_id=message.id,
            sender=message.sender,
            recipients=tuple(r.address for r in message.recipients),
            data=original,
            smtputf8=message.smtputf8,
            eightbit=message.eightbit,
        )
        return await self._transport.deliver(outbound, route.hops)


def _site_failure(report: DeliveryReport | NoRoute) -> bool:
    if isinstance(report, NoRoute):
        return not report.permanent
    return report.site_failure
