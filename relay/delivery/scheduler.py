"""The queue manager: picks due work, runs deliveries, records what happened.

Owns the delivery loop (Postfix's qmgr): wake on new mail, an operator's
flush, a finished delivery or a poll tick; claim due messages in batches into
per-destination ready lists; run per-destination workers (each delivers its
destination's messages one after another, so the transport reuses the
session) within the global limit and each destination's slow-start window,
taking destinations round-robin; probe dead destinations once per backoff
step; bounce what expired; hand every attempt's decision to the queue.
Refuses to speak SMTP or DNS itself (transport, resolver) and to write SQL
(queue, through the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from relay.core import maillog
from relay.core.clock import Clock
from relay.core.destination import Action, AttemptOutcome, State, Transition, transition
from relay.core.dsnparams import NO_RCPT_PARAMS
from relay.core.model import DeliveryReport, OutboundMessage, Outcome
from relay.core.recipients import Learned
from relay.delivery.outcomes import Decision, Rules, decide, delay_notice
from relay.delivery.persist import until_stored
from relay.delivery.resolver import NoRoute, Resolver
from relay.delivery.throttle import Window, pushed_back
from relay.delivery.transport import Transport
from relay.queue.access import Queue
from relay.queue.rows import Claimed, QueueError, Recorded, Selector
from relay.queue.store import Store

log = logging.getLogger("relay.delivery.scheduler")

PUSH_BACK_DELAY = 1.0  # seconds before a throttled message is offered again
PREFETCH_MAX_SIZE = 64 * 1024  # bodies up to this size are read with their claim


@dataclass(frozen=True, slots=True)
class Limits:
    concurrency: int
    per_destination: int
    poll_interval: float = 0.5  # how soon another process's flush is seen
    lease: float = 3600.0  # a claimed message returns to the queue after this
    expiry_interval: float = 60.0
    prune_interval: float = 3600.0
    log_retention: float = 7 * 86400.0

    @property
    def buffer(self) -> int:
        """Claimed-but-not-started messages we hold at most: claims come in batches."""
        return 2 * self.concurrency

    @property
    def low_water(self) -> int:
        """Waiting messages per destination below which its workers ask for more:
        two sessions' worth, so the next claim lands before the list runs dry
        (an empty list ends the workers and the window starts small again)."""
        return 2 * self.per_destination


class DeliveryMetrics(Protocol):
    """What the scheduler reports (relay_delivery_*, relay_destination_up);
    `relay.ops.metrics.Metrics` is the one `relay serve` passes."""

    def delivery(self, result: Outcome | str, seconds: float | None = None) -> None: ...

    def observe_delivery(self, seconds: float) -> None: ...

    def destination(self, name: str, state: State) -> None: ...

    def dsn_suppressed(self, spf_result: str) -> None: ...


class _Uncounted:
    """No metrics: a scheduler built without them (tests, tools) counts nothing."""

    def delivery(self, result: Outcome | str, seconds: float | None = None) -> None:
        pass

    def observe_delivery(self, seconds: float) -> None:
        pass

    def destination(self, name: str, state: State) -> None:
        pass

    def dsn_suppressed(self, spf_result: str) -> None:
        pass


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
        metrics: DeliveryMetrics | None = None,
        learned: Callable[[Sequence[Learned], datetime], None] | None = None,
        on_destination_back: Callable[[str], None] | None = None,
    ) -> None:
        """`learned`: told what an attempt's replies taught, once it is stored.
        `on_destination_back(name)`: a probe of ours found a down destination
        answering and its parked mail is due again (service.py tells the other
        nodes sharing the queue, so they claim it now rather than at their poll)."""
        self._store = store
        self._learned = learned
        self._on_destination_back = on_destination_back
        self._queue: Queue = store.queue
        self._resolver = resolver
        self._transport = transport
        self._rules = rules
        self._limits = limits
        self._clock = clock
        self._owner = owner
        self._next_hops = next_hops
        self._metrics: DeliveryMetrics = metrics or _Uncounted()
        self._wake = asyncio.Event()
        self._ready: dict[str, deque[Claimed]] = {}
        self._workers: Counter[str] = Counter()
        self._windows: dict[str, Window] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._turn = 0  # round-robin start among destinations
        self._stopping = False
        self._halt = asyncio.Event()  # set by stop(): retries of a write end
        self._last_expiry = 0.0
        self._last_prune = 0.0
        self._probed_at: datetime | None = None
        # Destinations our own attempts found down (its state machine, as far as
        # this process saw; the stored state is the queue's): absent means up.
        self._seen: dict[str, State] = {}
        # Bodies of claimed small messages, read in one go per claim (instead
        # of one read per delivery), by queue ID; taken when delivered.
        self._prefetched: dict[str, bytes] = {}

    def reconfigure(self, *, rules: Rules, limits: Limits, next_hops: dict[str, str],
                    resolver: Resolver) -> None:
        """A reload: the next claims and attempts follow these; deliveries under
        way finish as they began, and a destination's window keeps its size
        within the new per-destination limit."""
        self._rules = rules
        self._limits = limits
        for window in self._windows.values():
            window.limit = limits.per_destination
            window.size = min(window.size, float(window.limit))
        self._next_hops = next_hops
        self._resolver = resolver
        self.wake()

    def wake(self) -> None:
        """New mail or a flush: look for due work now instead of at the next tick."""
        self._wake.set()

    def mail_queued(self, destinations: Iterable[str]) -> None:
        """New mail was queued: wake up for it unless every destination is one
        we found down (its mail is parked until the probe: there is nothing to
        claim). A backup MX mostly takes mail for a dead primary, so this
        spares a claim transaction per accepted message; should the guess be
        stale, the next poll tick finds the mail anyway."""
        if any(self._seen.get(d, State.UP) is State.UP for d in destinations):
            self.wake()

    async def flush_domain(self, domain: str) -> int:
        """ETRN and operator flush: everything waiting for `domain` is due now."""
        flushed = await self._store.call(
            self._queue.flush, Selector(domain=domain), self._clock.now()
        )
        self.wake()
        return len(flushed)

    @property
    def busy(self) -> int:
        """Deliveries running now."""
        return sum(self._workers.values())

    async def run(self) -> None:
        """Loop until stop(); running deliveries are awaited by stop()."""
        now = self._clock.now()
        recovered = await self._store.call(self._queue.recover, self._owner, now)
        if recovered:
            log.info("returned %d interrupted deliveries to the queue", recovered)
        while not self._stopping:
            self._wake.clear()  # before the pass: a wake-up during it means "look again"
            try:
                await self._pass()
            except QueueError as exc:
                log.error("queue unavailable: %s", exc)
            except Exception:
                log.exception("scheduler pass failed")
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._limits.poll_interval)

    async def stop(self, grace: float) -> None:
        """Stop claiming; let deliveries finish for `grace` seconds, then put them back."""
        self._stopping = True
        self._halt.set()
        self._wake.set()
        waiting = [m.id for ready in self._ready.values() for m in ready]
        for ready in self._ready.values():
            ready.clear()  # in place: workers hold these deques
        self._ready.clear()
        self._prefetched.clear()
        if waiting:
            await self._store.call(self._queue.unclaim, waiting, self._owner, self._clock.now())
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                await self._store.call(self._queue.recover, self._owner, self._clock.now())

    async def run_once(self) -> None:
        """One pass, then every delivery it started, to the end (tests, benchmarks)."""
        await self._pass()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------ one pass

    async def _pass(self) -> None:
        now = self._clock.now()
        await self._housekeeping(now)
        if self._probed_at is None or (now - self._probed_at).total_seconds() >= (
            self._limits.poll_interval
        ):  # not on every wake-up: a drain wakes the loop once per delivered message
            self._probed_at = now
            stale = now - timedelta(seconds=self._limits.lease)
            for name in await self._store.call(self._queue.start_probes, now, stale):
                log.info("destination %s: probing after backoff", name)
        buffered = sum(len(r) for r in self._ready.values())
        room = self._limits.buffer - buffered
        if room >= self._limits.concurrency // 2 or (buffered == 0 and room > 0):
            # Destinations that already have two sessions' worth waiting are left
            # out, so one busy destination cannot fill the batch (fairness).
            saturated = [d for d, r in self._ready.items() if len(r) >= self._limits.low_water]
            claimed = await self._store.call(
                self._queue.claim_due, self._owner, now, room, self._limits.lease, saturated
            )
            await self._prefetch(claimed)
            for message in claimed:
                self._ready.setdefault(message.destination, deque()).append(message)
        self._start_workers()

    async def _prefetch(self, claimed: list[Claimed]) -> None:
        """Read the small bodies of a claim at once: at most `buffer` of them
        wait at a time, so this holds at most buffer x PREFETCH_MAX_SIZE."""
        small = [m for m in claimed if m.size <= PREFETCH_MAX_SIZE]
        if not small:
            return
        found = await self._store.read(self._queue.bodies, [m.body_id for m in small])
        for message in small:
            data = found.get(message.body_id)
            if data is not None:
                self._prefetched[message.id] = data

    async def _body(self, message: Claimed) -> bytes:
        data = self._prefetched.pop(message.id, None)
        if data is None:
            data = await self._store.read(self._queue.body, message.body_id)
        return data

    async def _housekeeping(self, now: datetime) -> None:
        mono = time.monotonic()
        if mono - self._last_expiry >= self._limits.expiry_interval:
            self._last_expiry = mono
            await self._expire(now)
            if self._rules.delay_warning > 0:
                await self._warn_delayed(now)
            await self._store.call(self._queue.compact_counts)
        if mono - self._last_prune >= self._limits.prune_interval:
            self._last_prune = mono
            await self._store.call(
                self._queue.prune_log, now - timedelta(seconds=self._limits.log_retention)
            )
            if self._rules.learning:  # what expired is dropped, not kept for ever
                await self._store.call(self._queue.prune_known, {
                    name: (now - timedelta(seconds=ttl.valid), now - timedelta(seconds=ttl.invalid))
                    for name, ttl in self._rules.learning.items()})

    def _window(self, destination: str) -> Window:
        window = self._windows.get(destination)
        if window is None:
            window = self._windows[destination] = Window(self._limits.per_destination)
        return window

    def _start_workers(self) -> None:
        """Give each destination with waiting mail workers up to its window, in turns."""
        destinations = [d for d, r in self._ready.items() if r]
        if not destinations:
            return
        self._turn = (self._turn + 1) % len(destinations)
        order = destinations[self._turn:] + destinations[: self._turn]
        progress = True
        while progress and self.busy < self._limits.concurrency:
            progress = False
            for destination in order:  # one worker per destination per round
                if self.busy >= self._limits.concurrency:
                    break
                waiting = len(self._ready.get(destination, ()))
                running = self._workers[destination]
                if waiting > 0 and running < min(self._window(destination).sessions,
                                                 running + waiting):
                    self._spawn(destination)
                    progress = True

    def _spawn(self, destination: str) -> None:
        self._workers[destination] += 1
        task = asyncio.create_task(self._worker(destination), name=f"deliver-{destination}")
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            self._workers[destination] -= 1
            if self._workers[destination] <= 0:
                del self._workers[destination]
            if not self._ready.get(destination):
                self._ready.pop(destination, None)
                if destination not in self._workers:
                    self._windows.pop(destination, None)  # idle: slow start again next time
            self._wake.set()

        task.add_done_callback(done)

    async def _worker(self, destination: str) -> None:
        """Deliver `destination`'s waiting messages one after another (session reuse).

        A delivered message's record commits while the next message is sent
        (at most one record in flight per worker, awaited before the worker
        goes on or ends): that commit is no condition of another message's
        delivery, and waiting for it halved a drain's speed on PostgreSQL."""
        ready = self._ready.get(destination)
        recording: asyncio.Task[AttemptOutcome] | None = None
        try:
            while ready and not self._stopping:
                if self._workers[destination] > self._window(destination).sessions:
                    return  # the window shrank: fewer sessions from now on
                message = ready.popleft()
                if len(ready) == self._limits.low_water - 1:
                    self.wake()  # running low: claim more while these are delivered
                result = await self._deliver(message)
                if recording is not None:  # the previous message's, in order
                    self._observe(destination, await recording)
                    recording = None
                if isinstance(result, asyncio.Task):
                    recording = result
                    continue
                if result is AttemptOutcome.PUSHED_BACK:
                    return
                if self._observe(destination, result).action is Action.PARK:
                    await self._park_rest(destination)
                    return
        finally:
            if recording is not None:
                self._observe(destination, await recording)

    def _observe(self, destination: str, outcome: AttemptOutcome) -> Transition:
        """Move our view of `destination` along its state machine."""
        step = transition(self._seen.get(destination, State.UP), outcome)
        if step.state is State.UP:
            self._seen.pop(destination, None)
        else:
            self._seen[destination] = step.state
        return step

    async def _park_rest(self, destination: str) -> None:
        """The destination is down: its other claimed messages wait for the probe."""
        ready = self._ready.get(destination)
        if not ready:
            return
        # Emptied in place: the destination's other workers hold this same deque
        # and must not go on delivering what is given back here.
        rest = [m.id for m in ready]
        ready.clear()
        for qid in rest:
            self._prefetched.pop(qid, None)
        await self._store.call(self._queue.unclaim, rest, self._owner, self._clock.now())

    # ------------------------------------------------------------ one message

    async def _expire(self, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self._rules.backoff.max_lifetime)
        expired = await self._store.call(
            self._queue.claim_expired, self._owner, now, cutoff, 500, self._limits.lease
        )
        for message in expired:
            original = await self._store.read(self._queue.body, message.body_id)
            decision = decide(
                self._rules, message, self._owner, now, report=None, original=original
            )
            if await self._store.record(decision.attempt) is Recorded.STALE:
                continue  # another claim has it now; that one reports
            maillog.attempt_results(message, decision, now)
            self._count(message.destination, decision, None)

    async def _warn_delayed(self, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self._rules.delay_warning)
        waiting = await self._store.call(
            self._queue.claim_unwarned, self._owner, now, cutoff, 500, self._limits.lease
        )
        for message in waiting:
            original = await self._store.read(self._queue.body, message.body_id)
            attempt = delay_notice(self._rules, message, self._owner, now, original)
            if await self._store.record(attempt) is Recorded.STALE:
                continue
            for dsn in attempt.dsns:
                maillog.delay_warning(message, dsn.id)
            maillog.bounces_suppressed(message, attempt.suppressed)
            for result in attempt.suppressed:
                self._metrics.dsn_suppressed(result)
        if waiting:
            self.wake()

    async def _deliver(self, message: Claimed) -> AttemptOutcome | asyncio.Task[AttemptOutcome]:
        """Attempt one message; what the attempt told about its destination, or,
        when a next hop took every recipient of a message that was no probe,
        the task recording that (the outcome once stored)."""
        started = time.monotonic()
        now = self._clock.now()
        window = self._window(message.destination)
        try:
            original = await self._body(message)
            if self._rules.backoff.expired(message.received_at, now):
                report: DeliveryReport | NoRoute | None = None
            else:
                report = await self._attempt(message, original)
            if (isinstance(report, DeliveryReport) and pushed_back(report)
                    and self._workers[message.destination] > 1):
                window.push_back()
                retry = self._clock.now() + timedelta(seconds=PUSH_BACK_DELAY)
                await self._store.call(self._queue.unclaim, [message.id], self._owner, retry)
                log.info("destination %s pushed back; window now %d sessions",
                         message.destination, window.sessions)
                return AttemptOutcome.PUSHED_BACK
            now = self._clock.now()
            failures = 0
            if isinstance(report, NoRoute | DeliveryReport) and _site_failure(report):
                failures = await self._store.read(self._queue.failures, message.destination)
            decision = decide(
                self._rules, message, self._owner, now, report=report, original=original,
                destination_failures=failures,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: delivery attempt failed unexpectedly; will retry", message.id)
            retry = self._clock.now() + timedelta(seconds=self._rules.backoff.min_backoff)
            await until_stored(
                lambda: self._store.call(self._queue.unclaim, [message.id], self._owner, retry),
                f"{message.id}: claim given back", self._halt, self._limits.lease)
            return AttemptOutcome.RETURNED
        record = self._record(message, decision, window, started, now)
        if decision.outcome is AttemptOutcome.DELIVERED and not message.probe:
            return asyncio.create_task(record, name=f"record-{message.id}")
        return await record

    async def _record(self, message: Claimed, decision: Decision, window: Window,
                      started: float, now: datetime) -> AttemptOutcome:
        """Store what the attempt did, then log and count it."""
        # The attempt happened: its record is kept trying while the database is
        # away, not dropped (the message would stay `active` for the whole lease).
        recorded = await until_stored(lambda: self._store.record(decision.attempt),
                                      f"{message.id}: delivery attempt", self._halt,
                                      self._limits.lease)
        if recorded is None or recorded is Recorded.STALE:
            # Our lease ran out and another claim took the message over: its
            # record stands, this one was refused (and logged) by the queue.
            return AttemptOutcome.RETURNED
        if recorded is Recorded.STORED and decision.attempt.learned and self._learned is not None:
            self._learned(decision.attempt.learned, now)
        if (message.probe and self._on_destination_back is not None
                and transition(State.PROBING, decision.outcome).action is Action.UNPARK):
            self._on_destination_back(message.destination)
        duration = time.monotonic() - started
        maillog.attempt_results(message, decision, now, duration)
        self._count(message.destination, decision, duration)
        if decision.attempt.dsns:
            self.wake()  # a DSN was queued
        if decision.outcome is AttemptOutcome.SITE_FAILURE:
            # The mail log says it once, when the queue records the transition.
            log.debug("%s: destination %s did not answer: %s", message.id,
                      message.destination, decision.attempt.last_error)
            return decision.outcome
        if window.timed(duration):
            log.info("destination %s slowed down (%.1f s for one message); window now %d",
                     message.destination, duration, window.sessions)
        elif any(outcome is Outcome.DELIVERED for _, outcome, _ in decision.results):
            window.success()
        return decision.outcome

    def _count(self, destination: str, decision: Decision, duration: float | None) -> None:
        for _, outcome, _ in decision.results:
            self._metrics.delivery(outcome)
        for result in decision.attempt.suppressed:
            self._metrics.dsn_suppressed(result)
        if duration is not None:
            self._metrics.observe_delivery(duration)
        if decision.outcome.informative:  # the attempt tested the destination's hosts
            self._metrics.destination(destination, transition(
                self._seen.get(destination, State.UP), decision.outcome).state)

    async def _attempt(self, message: Claimed, original: bytes) -> DeliveryReport | NoRoute:
        next_hop = self._next_hops.get(message.destination, "")
        maillog.attempt(message, next_hop)
        route = await self._resolver.route(message.destination, next_hop)
        if isinstance(route, NoRoute):
            return route
        outbound = OutboundMessage(
            queue_id=message.id,
            sender=message.sender,
            recipients=tuple(r.address for r in message.recipients),
            data=original,
            smtputf8=message.smtputf8,
            eightbit=message.eightbit,
            dsn=message.dsn,
            rcpt_dsn=tuple((r.address, r.params) for r in message.recipients
                           if r.params != NO_RCPT_PARAMS),
        )
        return await self._transport.deliver(outbound, route.hops)


def _site_failure(report: DeliveryReport | NoRoute) -> bool:
    if isinstance(report, NoRoute):
        return not report.permanent
    return report.site_failure
