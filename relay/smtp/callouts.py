"""Callouts at RCPT time, bounded: when an address may be probed, and what comes of it.

Owns, for `verify = "callout"` domains, the fate of an address nothing is
known of: at most one probe per address in flight (another RCPT for it awaits
the same probe), at most `PER_DESTINATION` per destination at once, and none
at all for a destination that is down: down in the queue (`destinations`,
as delivery found it on any node; re-read every few seconds), or down in
this node's view because its next hop did not answer a probe, until its next
backoff step. That view moves along delivery's own state machine
(`relay.core.destination.transition`: a hop that answered RCPT is reached, one
that did not is a site failure) with delivery's backoff (`delivery.min_backoff`
doubling up to `delivery.max_backoff`); when its time comes, one probe tests
it. It is not written to `destinations`: a probe has seconds where delivery
has minutes, and parking a destination's mail on that word would hold mail a
patient delivery would have handed over; delivery's own attempts decide that.

What a verdict teaches is learned in this node's copy the moment RCPT is
answered (the next RCPT for the address asks no one) and stored with source
`callout` through the queue writer (other nodes learn it at their next
refresh). A waiting RCPT never waits longer than its domain's
`verify_timeout`. Refuses the conversation (`relay.delivery.callout`), routing
(`relay.delivery.resolver`) and the SMTP replies (`policy.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from relay.core import maillog
from relay.core.clock import Clock
from relay.core.destination import Action, AttemptOutcome, State, transition
from relay.core.model import Hop
from relay.core.recipients import KnownState, Learned, Source
from relay.delivery.backoff import BackoffPolicy
from relay.delivery.callout import UNKNOWN, Probe
from relay.delivery.resolver import NoRoute, Resolver
from relay.smtp.verify import REFRESH_INTERVAL, KnownRecipients

log = logging.getLogger("relay.smtp.callouts")

PER_DESTINATION = 3  # probes at once to one destination's next hop
GRACE = 0.05  # seconds: a guard only; a probe resolves its RCPT at its own deadline

Learn = Callable[[Sequence[Learned], datetime], Awaitable[object]]
ReadDown = Callable[[], Awaitable[Iterable[str]]]


class Prober(Protocol):
    """What a callout needs of the outbound side (`relay.delivery.callout.CalloutClient`)."""

    async def probe(self, address: str, hops: Sequence[Hop], timeout: float,
                    told: Callable[[Probe], None] | None = None) -> Probe: ...


@dataclass(slots=True)
class _Down:
    """This node's view of a destination whose next hop did not answer a probe."""

    state: State  # DOWN (no probe before `retry_at`) or PROBING (one probe tests it)
    failures: int
    retry_at: datetime


class Callouts:
    """The probes of this node: in flight, per destination, and what they taught."""

    def __init__(
        self, *, prober: Prober, resolver: Resolver, clock: Clock, backoff: BackoffPolicy,
        known: KnownRecipients, next_hops: dict[str, str] | None = None,
        learn: Learn | None = None, counted: Callable[[str], None] | None = None,
        per_destination: int = PER_DESTINATION,
    ) -> None:
        """`learn`: stores what probes taught (the queue writer); `counted`: told
        each probe's result (`valid`, `invalid`, `unknown`) for the metrics."""
        self.prober = prober
        self.resolver = resolver
        self.backoff = backoff
        self.next_hops = dict(next_hops or {})
        self.active = False  # some domain calls out: worth reading the queue's down list
        self._clock = clock
        self._known = known
        self._learn = learn
        self._counted = counted or (lambda result: None)
        self._per_destination = per_destination
        self._inflight: dict[str, asyncio.Future[KnownState | None]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._seen: dict[str, _Down] = {}
        self._queue_down: frozenset[str] = frozenset()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ RCPT

    async def check(self, address: str, key: str, destination: str,
                    timeout: float) -> KnownState | None:
        """What the next hop says of `address` (known by `key`), within
        `timeout` seconds; None: nothing could be learned (unknown)."""
        flight = self._inflight.get(key)
        wait = timeout  # joining a probe in flight: at most our own timeout
        if flight is None:
            if not self._may_probe(destination):
                return None
            wait = timeout + GRACE  # ours: it ends by `timeout`, and says how first
            flight = asyncio.get_running_loop().create_future()
            self._inflight[key] = flight
            task = asyncio.create_task(self._probe(address, key, destination, timeout, flight),
                                       name=f"callout {key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if flight.done():
            return flight.result()
        try:
            async with asyncio.timeout(wait):
                return await asyncio.shield(flight)  # a client gone does not end the probe
        except TimeoutError:
            return None

    def _may_probe(self, destination: str) -> bool:
        if destination in self._queue_down:
            log.debug("callout: destination %s is down in the queue: not probed", destination)
            return False
        down = self._seen.get(destination)
        if down is None:
            return True
        if down.state is State.PROBING or self._clock.now() < down.retry_at:
            return False
        down.state = State.PROBING  # its backoff step came: this probe tests it
        return True

    # ------------------------------------------------------------ one probe

    async def _probe(self, address: str, key: str, destination: str, timeout: float,
                     flight: asyncio.Future[KnownState | None]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def told(probe: Probe) -> None:
            if flight.done():
                return  # told already, as RCPT was answered
            if probe.state is not None:
                self._known.taught([Learned(address, probe.state, Source.CALLOUT)],
                                   self._clock.now(), by="a callout")
            flight.set_result(probe.state)

        try:
            probe, tested = await self._ask(address, destination, deadline, told)
            told(probe)
            self._after(destination, AttemptOutcome.RETURNED if not tested
                        else AttemptOutcome.DELIVERED if probe.answered
                        else AttemptOutcome.SITE_FAILURE)
            maillog.callout(address, probe.host or "none", probe.result, probe.reply)
            self._counted(probe.result)
            if probe.state is not None and self._learn is not None:
                learned = Learned(address, probe.state, Source.CALLOUT)
                now = self._clock.now()
                try:
                    await self._learn([learned], now)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # known here all the same; asked again elsewhere
                    log.warning("callout verdict for %s not stored: %s", address, exc)
                else:
                    self._known.taught([learned], now, by="a callout")  # after a reload's read
                    log.debug("callout verdict for %s stored: %s", address, probe.result)
        finally:
            if not flight.done():
                flight.set_result(None)
            if self._inflight.get(key) is flight:
                del self._inflight[key]

    async def _ask(self, address: str, destination: str, deadline: float,
                   told: Callable[[Probe], None]) -> tuple[Probe, bool]:
        """Route, then probe, within `deadline` (the loop's time); and whether
        that tested the destination (its hops, or a route that failed for now)."""
        loop = asyncio.get_running_loop()
        slots = self._slots.setdefault(destination, asyncio.Semaphore(self._per_destination))
        try:
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
        except TimeoutError:  # others probe it already, for as long as we may wait
            return Probe(UNKNOWN, "", "no probe slot free in time", answered=False), False
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    route = await self.resolver.route(destination,
                                                      self.next_hops.get(destination, ""))
            except TimeoutError:  # DNS, not the next hop
                return Probe(UNKNOWN, "", "no route found in time", answered=False), False
            if isinstance(route, NoRoute):
                probe = Probe(UNKNOWN, "", f"no route: {route.reason}", answered=False)
                return probe, not route.permanent
            remaining = max(0.0, deadline - loop.time())
            return await self.prober.probe(address, route.hops, remaining, told), True
        finally:
            slots.release()

    def _after(self, destination: str, outcome: AttemptOutcome) -> None:
        """Move this node's view of `destination` along the state machine:
        `DELIVERED` for a hop that answered RCPT, `SITE_FAILURE` for none that
        did, `RETURNED` for a probe that did not test the hops (no slot, no
        route in time): if it was the one probe of a down destination, the
        next RCPT may probe it."""
        prior = self._seen.get(destination)
        step = transition(prior.state if prior is not None else State.UP, outcome)
        if step.action is Action.REPROBE and prior is not None:
            prior.state, prior.retry_at = State.DOWN, self._clock.now()
            return
        if step.action is Action.NONE and step.state is not State.UP:
            return  # down already, and no word on it
        if step.state is State.UP:
            if self._seen.pop(destination, None) is not None:
                log.info("callout: destination %s answers again; probes resume", destination)
            return
        now = self._clock.now()
        if step.backoff_step or prior is None:
            failures = (prior.failures if prior is not None else 0) + 1
            retry_at = self.backoff.next_attempt(now, failures)
            log.info("callout: destination %s did not answer; no probe before %s",
                     destination, retry_at.isoformat())
        else:
            failures, retry_at = prior.failures, prior.retry_at
        self._seen[destination] = _Down(step.state, failures, retry_at)

    # ------------------------------------------------------------ upkeep

    def see_down(self, destinations: Iterable[str]) -> None:
        """The destinations the queue has down (delivery found them so)."""
        down = frozenset(destinations)
        if down != self._queue_down:
            log.debug("callout: down in the queue now: %s", ", ".join(sorted(down)) or "none")
        self._queue_down = down

    async def run(self, read: ReadDown, interval: float = REFRESH_INTERVAL) -> None:
        """Re-read the queue's down destinations every `interval` seconds while
        some domain calls out; a failing read keeps what we had."""
        while True:
            if self.active:
                try:
                    self.see_down(await read())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("down destinations not refreshed for callouts: %s", exc)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop the probes under way (on shutdown): their RCPTs get `unknown`."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
