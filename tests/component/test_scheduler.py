"""The scheduler with a scripted transport, an injected clock and a real SQLite queue.

A destination goes down, stays down and comes back: the tests count attempts
per backoff step and check the order of delivery. Time only moves when the
test moves the FakeClock; `run_once` runs one pass and waits for the
deliveries it started.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from itertools import count
from pathlib import Path

import pytest

from relay.core.clock import FakeClock
from relay.core.model import DeliveryReport, Hop, OutboundMessage, Reply
from relay.delivery.backoff import BackoffPolicy
from relay.delivery.outcomes import Rules
from relay.delivery.resolver import NoRoute, Route
from relay.delivery.scheduler import PREFETCH_MAX_SIZE, Limits, Scheduler
from relay.ops.metrics import Metrics
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import Attempt, Claimed, NewMessage, Recorded
from relay.queue.store import Store

REFUSED = Reply(451, "4.4.1 connect to mail.verrotech.com[127.0.0.2]:25: Connection refused")
OK = Reply(250, "2.0.0 Ok: queued")


def refused(message: OutboundMessage) -> DeliveryReport:
    return DeliveryReport(replies=dict.fromkeys(message.recipients, REFUSED), site_failure=True,
                          errors=(str(REFUSED),))


def accepted(message: OutboundMessage) -> DeliveryReport:
    return DeliveryReport(replies=dict.fromkeys(message.recipients, OK),
                          remote_host="mail.verrotech.com[127.0.0.2]:25")


class ScriptedTransport:
    """Answers with `script(message)`; records the queue IDs in call order."""

    def __init__(self, script: Callable[[OutboundMessage], DeliveryReport]) -> None:
        self.script = script
        self.calls: list[str] = []
        self.arrivals: asyncio.Queue[str] = asyncio.Queue()  # the calls, to wait for
        self.gate: asyncio.Event | None = None  # when set: deliveries wait for it

    async def deliver(self, message: OutboundMessage, hops: Sequence[Hop]) -> DeliveryReport:
        self.calls.append(message.queue_id)
        self.arrivals.put_nowait(message.queue_id)
        if self.gate is not None:
            await self.gate.wait()
        return self.script(message)


class OneHop:
    async def route(self, domain: str, next_hop: str = "") -> Route | NoRoute:
        return Route((Hop("mail." + domain, "127.0.0.2", 25, 10),))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    db.upgrade(engine)
    store = Store(Queue(engine))
    yield store
    store.close()
    engine.dispose()


def make_scheduler(store: Store, clock: FakeClock, transport: ScriptedTransport,
                   concurrency: int = 10, per_destination: int = 5,
                   delay_warning: float = 0, poll_interval: float = 0.5,
                   on_destination_back: Callable[[str], None] | None = None) -> Scheduler:
    ids = count(1)
    return Scheduler(
        store=store,
        resolver=OneHop(),
        transport=transport,
        rules=Rules(
            hostname="mail.verrotech.net",
            backoff=BackoffPolicy(min_backoff=60, max_backoff=600, max_lifetime=86400),
            delay_warning=delay_warning,
            new_id=lambda: f"DSN{next(ids):04d}",
            rng=random.Random(1),
        ),
        # housekeeping on every pass: time is the FakeClock
        limits=Limits(concurrency=concurrency, per_destination=per_destination,
                      expiry_interval=0, poll_interval=poll_interval),
        clock=clock,
        owner="mail.verrotech.net",
        next_hops={},
        metrics=Metrics(),
        on_destination_back=on_destination_back,
    )


def queue_mail(store: Store, clock: FakeClock, n: int, domain: str = "verrotech.com",
               prefix: str = "M") -> list[str]:
    ids = [f"{prefix}{i:04d}" for i in range(n)]
    store.queue.put_many([
        NewMessage(id=qid, sender="s@sender.example", recipients=(f"alice@{domain}",),
                   data=b"Subject: x\r\n\r\nbody\r\n",
                   received_at=clock.now() + timedelta(microseconds=i))
        for i, qid in enumerate(ids)
    ])
    clock.advance(0.001)  # all of them are due now
    return ids


async def test_dead_destination_is_probed_once_per_backoff_step(
    store: Store, clock: FakeClock
) -> None:
    ids = queue_mail(store, clock, 20)
    transport = ScriptedTransport(refused)
    scheduler = make_scheduler(store, clock, transport, per_destination=1)

    await scheduler.run_once()  # discovers the outage
    first = len(transport.calls)
    assert first == 1
    down = store.queue.down_destinations()
    assert set(down) == {"verrotech.com"}
    retry = down["verrotech.com"]
    assert retry is not None
    assert 54 <= (retry - clock.now()).total_seconds() <= 66  # one step: min_backoff +-10 %
    assert store.queue.failures("verrotech.com") == 1

    for _ in range(3):  # nothing is due while the destination is down
        clock.advance(15)
        await scheduler.run_once()
    assert len(transport.calls) == first

    steps = []
    for _ in range(4):  # each backoff step: exactly one probe, the oldest message
        before = len(transport.calls)
        retry = store.queue.down_destinations()["verrotech.com"]
        assert retry is not None
        clock.set(retry + timedelta(seconds=1))
        await scheduler.run_once()
        await scheduler.run_once()
        steps.append(transport.calls[before:])
    assert steps == [[ids[0]]] * 4
    assert store.queue.failures("verrotech.com") == 5
    assert store.queue.stats().total == 20

    transport.script = accepted  # the primary is back
    retry = store.queue.down_destinations()["verrotech.com"]
    assert retry is not None
    clock.set(retry + timedelta(seconds=1))
    before = len(transport.calls)
    for _ in range(5):
        await scheduler.run_once()
    drained = transport.calls[before:]
    assert drained == ids  # the probe (oldest) first, then all the rest in arrival order
    assert store.queue.stats().total == 0
    assert store.queue.down_destinations() == {}


async def test_sessions_failing_together_count_as_one_step(
    store: Store, clock: FakeClock
) -> None:
    queue_mail(store, clock, 20)
    transport = ScriptedTransport(refused)
    scheduler = make_scheduler(store, clock, transport, per_destination=5)
    await scheduler.run_once()
    assert 1 <= len(transport.calls) <= 5  # at most one window of sessions finds out
    assert store.queue.failures("verrotech.com") == 1
    assert store.queue.claim_due("x", clock.now() + timedelta(seconds=50), 100, 60) == []


async def test_busy_destination_does_not_starve_another(store: Store, clock: FakeClock) -> None:
    busy = queue_mail(store, clock, 30, domain="busy.example", prefix="A")
    clock.advance(1)
    other = queue_mail(store, clock, 2, domain="other.example", prefix="B")
    transport = ScriptedTransport(accepted)
    transport.gate = asyncio.Event()
    scheduler = make_scheduler(store, clock, transport, concurrency=2, per_destination=1)

    for _ in range(3):
        await scheduler._pass()
        await asyncio.sleep(0)  # let started workers take their first message
    for _ in range(2):
        await asyncio.wait_for(transport.arrivals.get(), 10)
    # one session each: the busy destination has not taken both slots
    assert sorted(transport.calls) == [busy[0], other[0]]
    transport.gate.set()
    while store.queue.stats().total:
        await scheduler.run_once()
    assert sorted(transport.calls) == sorted(busy + other)


async def test_push_back_shrinks_the_window_and_fails_nothing(
    store: Store, clock: FakeClock
) -> None:
    ids = queue_mail(store, clock, 12)
    sessions = {"open": 0}

    class Throttling(ScriptedTransport):
        async def deliver(self, message: OutboundMessage,
                          hops: Sequence[Hop]) -> DeliveryReport:
            self.calls.append(message.queue_id)
            sessions["open"] += 1
            try:
                await asyncio.sleep(0)  # overlap with the other workers
                if sessions["open"] > 2:
                    reply = Reply(421, "4.7.0 too many connections from your host")
                    return DeliveryReport(replies=dict.fromkeys(message.recipients, reply),
                                          remote_host="mail.verrotech.com[127.0.0.2]:25")
                return accepted(message)
            finally:
                sessions["open"] -= 1

    transport = Throttling(accepted)
    scheduler = make_scheduler(store, clock, transport)
    for _ in range(20):
        await scheduler.run_once()
        clock.advance(2)
        if not store.queue.stats().total:
            break
    assert store.queue.stats().total == 0  # everything delivered in the end
    history = [h[2] for qid in ids for h in store.queue.history(qid)]
    assert history == ["delivered"] * 12  # no attempt was charged to a message


async def test_parked_mail_gets_one_delay_warning(store: Store, clock: FakeClock) -> None:
    ids = queue_mail(store, clock, 3)
    transport = ScriptedTransport(refused)
    scheduler = make_scheduler(store, clock, transport, per_destination=1,
                               delay_warning=3600)
    await scheduler.run_once()  # the destination is found down; everything parks
    assert store.queue.claim_due("x", clock.now(), 10, 60) == []
    clock.advance(1800)
    await scheduler.run_once()
    assert not [v for v in store.queue.list() if v.sender == ""]  # too early
    clock.advance(1801)
    await scheduler.run_once()
    await scheduler.run_once()
    warnings = [v for v in store.queue.list() if v.sender == ""]
    assert len(warnings) == 3  # one per message, none for the DSNs themselves
    assert {v.recipients[0].address for v in warnings} == {"s@sender.example"}
    raw = store.queue.raw(warnings[0].id) or b""
    assert b"Action: delayed" in raw and b"Status: 4.4.1" in raw
    # a warning is no attempt: the originals were charged only for real ones (probes)
    originals = [v for v in store.queue.list() if v.id in ids]
    assert sum(v.attempts for v in originals) == len([c for c in transport.calls if c in ids])
    clock.advance(7200)
    await scheduler.run_once()
    assert len([v for v in store.queue.list() if v.sender == ""]) == 3  # warned once only


async def test_workers_running_low_ask_for_more_before_they_run_dry(
    store: Store, clock: FakeClock
) -> None:
    """No poll tick needed between claims: once a destination's waiting list
    drops below two sessions' worth, the next claim is made while its workers
    are still busy (a list that runs dry ends the workers, their SMTP
    sessions and their grown window)."""
    queue_mail(store, clock, 30)
    loop = asyncio.get_running_loop()
    permits = asyncio.Semaphore(0)
    claims: list[int] = []
    second_claim = asyncio.Event()
    original = store.queue.claim_due

    def claim_due(*args: object, **kwargs: object) -> list[Claimed]:  # counts the claims
        found = original(*args, **kwargs)  # type: ignore[arg-type]
        claims.append(len(found))
        if len(claims) == 2:
            loop.call_soon_threadsafe(second_claim.set)
        return found

    store.queue.claim_due = claim_due  # type: ignore[method-assign]

    class SteppedTransport(ScriptedTransport):
        async def deliver(self, message: OutboundMessage, hops: Sequence[Hop]) -> DeliveryReport:
            self.arrivals.put_nowait(message.queue_id)
            await permits.acquire()
            return accepted(message)

    transport = SteppedTransport(accepted)
    arrivals = transport.arrivals
    scheduler = make_scheduler(store, clock, transport, concurrency=4,
                               per_destination=2, poll_interval=3600)  # no tick comes
    running = asyncio.create_task(scheduler.run())
    try:
        for _ in range(2):  # the first claim: 8 (twice the concurrency); 2 sessions start
            await asyncio.wait_for(arrivals.get(), 10)
        assert claims == [8]
        for _ in range(3):  # one at a time: 6 waiting, 5, 4, then 3: below 2 x 2
            permits.release()
            await asyncio.wait_for(arrivals.get(), 10)
        await asyncio.wait_for(second_claim.wait(), 10)
        assert claims == [8, 5]  # topped up to 8 while both sessions were busy
    finally:
        for _ in range(100):
            permits.release()
        await scheduler.stop(grace=5)
        await running


async def test_new_mail_for_a_destination_found_down_wakes_nobody(
    store: Store, clock: FakeClock
) -> None:
    queue_mail(store, clock, 1)
    scheduler = make_scheduler(store, clock, ScriptedTransport(refused))
    scheduler.mail_queued({"verrotech.com"})
    assert scheduler._wake.is_set()  # nothing known yet: look
    await scheduler.run_once()  # finds it down
    scheduler._wake.clear()
    scheduler.mail_queued({"verrotech.com"})
    assert not scheduler._wake.is_set()  # parked mail: nothing to claim
    scheduler.mail_queued({"verrotech.com", "other.example"})
    assert scheduler._wake.is_set()


async def test_small_bodies_are_read_with_their_claim(store: Store, clock: FakeClock) -> None:
    small = queue_mail(store, clock, 10)
    big = b"Subject: big\r\n\r\n" + b"x" * (PREFETCH_MAX_SIZE + 1) + b"\r\n"
    store.queue.put_many([NewMessage(id="BIG", sender="s@sender.example",
                                     recipients=("alice@verrotech.com",), data=big,
                                     received_at=clock.now())])
    clock.advance(0.001)
    reads: list[str] = []
    one, many = store.queue.body, store.queue.bodies
    store.queue.body = lambda body_id: reads.append("one") or one(body_id)  # type: ignore[method-assign]
    store.queue.bodies = lambda ids: reads.append("many") or many(ids)  # type: ignore[method-assign]
    delivered: dict[str, bytes] = {}

    def keep(message: OutboundMessage) -> DeliveryReport:
        delivered[message.queue_id] = message.data
        return accepted(message)

    scheduler = make_scheduler(store, clock, ScriptedTransport(keep))
    await scheduler.run_once()
    assert sorted(delivered) == sorted([*small, "BIG"])
    assert reads == ["many", "one"]  # ten small ones in one read; the big one alone
    assert delivered["BIG"] == big
    assert delivered[small[3]] == b"Subject: x\r\n\r\nbody\r\n"


async def test_a_delivery_whose_lease_was_taken_over_is_not_recorded(
    store: Store, clock: FakeClock
) -> None:
    """The lease ran out mid-delivery and another node claimed the message:
    our record is refused, and neither the mail log, metrics nor our view of
    the destination take this attempt into account."""
    [qid] = queue_mail(store, clock, 1)
    transport = ScriptedTransport(refused)
    transport.gate = asyncio.Event()
    scheduler = make_scheduler(store, clock, transport)
    metrics = scheduler._metrics
    await scheduler._pass()
    assert await asyncio.wait_for(transport.arrivals.get(), 10) == qid

    clock.advance(3601)  # past Limits.lease
    assert store.queue.recover("other-node", clock.now()) == 1
    [theirs] = store.queue.claim_due("other-node", clock.now(), limit=1, lease=3600)
    transport.gate.set()  # our site failure comes back, too late
    await scheduler.run_once()

    [view] = store.queue.list()
    assert (view.id, view.state, view.attempts) == (qid, "active", 0)
    assert store.queue.down_destinations() == {}  # the refused record parked nothing
    assert store.queue.history(qid) == []
    assert metrics.registry.get_sample_value(
        "relay_delivery_attempts_total", {"result": "deferred"}) == 0
    assert metrics._destinations.snapshot() == {}
    assert scheduler._seen == {}
    assert theirs.id == qid


async def test_a_probe_that_finds_its_destination_back_tells_the_other_nodes(
    store: Store, clock: FakeClock
) -> None:
    """Only the answered probe calls `on_destination_back` (service.py turns it
    into a NOTIFY for the nodes sharing the queue); failed probes and the
    drain that follows do not."""
    queue_mail(store, clock, 5)
    transport = ScriptedTransport(refused)
    back: list[str] = []
    scheduler = make_scheduler(store, clock, transport, per_destination=1,
                               on_destination_back=back.append)
    await scheduler.run_once()  # discovers the outage
    for script in (refused, accepted):  # a failed probe, then one that gets through
        transport.script = script
        retry = store.queue.down_destinations()["verrotech.com"]
        assert retry is not None
        clock.set(retry + timedelta(seconds=1))
        await scheduler.run_once()
        await scheduler.run_once()
        assert back == ([] if script is refused else ["verrotech.com"])
    for _ in range(3):
        await scheduler.run_once()
    assert store.queue.stats().total == 0
    assert back == ["verrotech.com"]


class HeldRecords(Store):
    """A store whose recorded attempts wait for `release` before they reach the writer."""

    def __init__(self, queue: Queue) -> None:
        super().__init__(queue)
        self.release = asyncio.Event()
        self.waiting = 0

    async def record(self, attempt: Attempt) -> Recorded:
        self.waiting += 1
        await self.release.wait()
        return await super().record(attempt)


async def test_a_delivered_message_is_recorded_while_the_next_one_is_sent(
    tmp_path: Path, clock: FakeClock
) -> None:
    """One session, two messages: the second goes out while the first's record
    is still uncommitted; the worker ends only once both are stored."""
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    db.upgrade(engine)
    store = HeldRecords(Queue(engine))
    try:
        ids = queue_mail(store, clock, 2)
        transport = ScriptedTransport(accepted)
        scheduler = make_scheduler(store, clock, transport, per_destination=1)
        running = asyncio.create_task(scheduler.run_once())
        assert await asyncio.wait_for(transport.arrivals.get(), 10) == ids[0]
        assert await asyncio.wait_for(transport.arrivals.get(), 10) == ids[1]  # not waiting
        assert store.waiting >= 1 and store.queue.counts()["active"] == 2  # nothing recorded
        assert not running.done()
        store.release.set()
        await asyncio.wait_for(running, 10)
        assert sum(store.queue.counts().values()) == 0  # both stored before run_once ended
    finally:
        store.close()
        engine.dispose()
