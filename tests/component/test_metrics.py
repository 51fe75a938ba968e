"""Queue depth counters, the metrics registry and the HTTP endpoint, for real.

`queue_counts` (kept by triggers) must equal a real GROUP BY over `messages`
after every queue operation, scripted and randomised; `/metrics` is scraped
over a loopback socket and parsed; `/healthz` and the HTTP edge cases are
exercised with raw bytes. SQLite and PostgreSQL (the session's private
server from tests/support/postgres.py, or RELAY_TEST_POSTGRES_URL's).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select, text

from relay.core.clock import FakeClock
from relay.core.destination import AttemptOutcome, State
from relay.core.model import MessageState, Outcome, RecipientStatus
from relay.core.values import HostPort
from relay.ops.http import HealthCheck, start_http
from relay.ops.metrics import METRICS, PER_PROCESS, Metrics
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import (
    Attempt,
    Claimed,
    DestinationUpdate,
    NewMessage,
    QueueError,
    RecipientUpdate,
    Selector,
)
from relay.queue.schema import messages

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]
STATES = tuple(s.value for s in MessageState)

# The contract (SPEC "Metrics"): name -> (type, labels). Kept here, not taken
# from relay.ops.metrics, so that a rename there fails this test.
SPEC_METRICS = {
    "relay_queue_messages": ("gauge", {"state"}),
    "relay_queue_oldest_message_age_seconds": ("gauge", set()),
    "relay_smtp_messages_accepted_total": ("counter", set()),
    "relay_smtp_rejections_total": ("counter", {"reason"}),
    "relay_smtp_sessions_active": ("gauge", set()),
    "relay_delivery_attempts_total": ("counter", {"result"}),
    "relay_delivery_duration_seconds": ("histogram", set()),
    "relay_destination_up": ("gauge", {"destination"}),
}


# -- databases -------------------------------------------------------------------



def new(qid: str, *rcpts: str, at: datetime = T0, sender: str = "s@sender.example") -> NewMessage:
    return NewMessage(id=qid, sender=sender, recipients=rcpts or ("a@verrotech.com",),
                      data=b"Subject: x\r\n\r\nbody\r\n", received_at=at)


def truth(queue: Queue) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """What a full scan says: by state (all states), by destination."""
    by_state = dict.fromkeys(STATES, 0)
    by_dest: dict[str, dict[str, int]] = {}
    with queue.engine.connect() as conn:
        for dest, state, n in conn.execute(
            select(messages.c.destination, messages.c.state, func.count())
            .group_by(messages.c.destination, messages.c.state)
        ):
            by_state[state] += n
            by_dest.setdefault(dest, dict.fromkeys(STATES, 0))[state] = n
    return by_state, by_dest


def assert_exact(queue: Queue) -> dict[str, int]:
    by_state, by_dest = truth(queue)
    assert queue.counts() == by_state
    assert queue.counts_by_destination() == by_dest
    stats = queue.stats()
    assert stats.total == sum(by_state.values())
    assert stats.by_state == {s: n for s, n in by_state.items() if n}
    assert stats.by_domain == {d: sum(per.values()) for d, per in by_dest.items()}
    return by_state


def outcome(claimed: Claimed, status: RecipientStatus) -> tuple[RecipientUpdate, ...]:
    return tuple(RecipientUpdate(r.id, r.address, status, "reply", Outcome(status.value))
                 for r in claimed.recipients)


# -- counts stay exact -------------------------------------------------------------


def test_counts_stay_exact_through_every_queue_operation(queue: Queue) -> None:
    assert assert_exact(queue) == {"active": 0, "deferred": 0, "hold": 0}
    queue.put_many([
        new("01", "a@verrotech.com", "b@other.example", "c@third.example"),  # split in 3
        new("02", "a@verrotech.com", at=T0 + timedelta(seconds=1)),
        new("03", "x@other.example", at=T0 + timedelta(seconds=2)),
    ])
    assert assert_exact(queue) == {"active": 0, "deferred": 5, "hold": 0}
    assert queue.counts_by_destination()["other.example"] == {
        "active": 0, "deferred": 2, "hold": 0}

    claimed = queue.claim_due("n", T0 + timedelta(minutes=1), limit=3, lease=600)
    assert len(claimed) == 3
    assert assert_exact(queue) == {"active": 3, "deferred": 2, "hold": 0}

    first, second, third = claimed
    retry = T0 + timedelta(minutes=5)
    queue.record(Attempt(message_id=first.id, owner="n",
                         lease_until=first.lease_until, at=T0, next_attempt_at=retry,
                         recipients=outcome(first, RecipientStatus.DEFERRED)))
    assert assert_exact(queue) == {"active": 2, "deferred": 3, "hold": 0}
    queue.record(Attempt(  # bounced: removed, and its DSN queued
        message_id=second.id, owner="n",
        lease_until=second.lease_until, at=T0, next_attempt_at=None,
        recipients=outcome(second, RecipientStatus.BOUNCED),
        dsns=(new("DSN1", "s@sender.example", sender=""),)))
    assert assert_exact(queue) == {"active": 1, "deferred": 4, "hold": 0}
    assert queue.unclaim([third.id], "n", retry) == 1
    assert assert_exact(queue) == {"active": 0, "deferred": 5, "hold": 0}

    assert len(queue.hold(Selector(domain="other.example"))) == 1
    assert assert_exact(queue) == {"active": 0, "deferred": 4, "hold": 1}
    assert len(queue.hold(Selector(domain="other.example"))) == 0  # no state change, no count
    assert assert_exact(queue)["hold"] == 1
    assert len(queue.flush(Selector(everything=True), T0)) == 4  # next_attempt_at only
    assert assert_exact(queue) == {"active": 0, "deferred": 4, "hold": 1}

    # an active message held by the operator comes back as held
    [active] = queue.claim_ids(["02"], "n", T0, lease=600)
    assert assert_exact(queue) == {"active": 1, "deferred": 3, "hold": 1}
    queue.hold(Selector(ids=("02",)))
    assert assert_exact(queue) == {"active": 0, "deferred": 3, "hold": 2}
    queue.record(Attempt(message_id=active.id, owner="n",
                         lease_until=active.lease_until, at=T0, next_attempt_at=retry,
                         recipients=outcome(active, RecipientStatus.DEFERRED)))
    assert assert_exact(queue) == {"active": 0, "deferred": 3, "hold": 2}

    assert len(queue.release(Selector(everything=True), T0)) == 2
    assert assert_exact(queue) == {"active": 0, "deferred": 5, "hold": 0}

    # a destination going down parks its mail: no state change
    [c] = queue.claim_due("n", retry, limit=1, lease=60)
    queue.record(Attempt(
        message_id=c.id, owner="n", lease_until=c.lease_until, at=T0, next_attempt_at=None,
        recipients=outcome(c, RecipientStatus.DEFERRED),
        destination=DestinationUpdate(c.destination, AttemptOutcome.SITE_FAILURE, retry_at=retry)))
    assert assert_exact(queue) == {"active": 0, "deferred": 5, "hold": 0}

    # a crashed scheduler's leases come back
    queue.claim_due("dead", retry, limit=2, lease=60)
    assert assert_exact(queue)["active"] == 2
    assert queue.recover("me", retry + timedelta(minutes=2)) == 2
    assert assert_exact(queue) == {"active": 0, "deferred": 5, "hold": 0}

    assert len(queue.delete(Selector(everything=True))) == 5
    assert assert_exact(queue) == {"active": 0, "deferred": 0, "hold": 0}
    assert queue.counts_by_destination() == {}


def test_direct_sql_writes_are_counted_too(queue: Queue) -> None:
    """Triggers, not Python: any writer (a future CLI, psql) keeps counts right."""
    queue.put_many([new("01"), new("02", "x@other.example")])
    with queue.engine.begin() as conn:
        conn.execute(text("UPDATE messages SET destination = 'moved.example' WHERE id = '01'"))
        conn.execute(text("UPDATE messages SET state = 'hold' WHERE id = '02'"))
        conn.execute(text("UPDATE messages SET state = 'hold', attempts = 3 WHERE id = '02'"))
    assert assert_exact(queue) == {"active": 0, "deferred": 1, "hold": 1}
    assert set(queue.counts_by_destination()) == {"moved.example", "other.example"}
    with queue.engine.begin() as conn:
        conn.execute(text("DELETE FROM recipients"))
        conn.execute(text("DELETE FROM messages"))
    assert assert_exact(queue) == dict.fromkeys(STATES, 0)


def test_a_failed_transaction_leaves_counts_alone(queue: Queue) -> None:
    queue.put_many([new("01")])
    with pytest.raises(QueueError):
        queue.put_many([new("02"), new("01")])  # duplicate: the whole batch rolls back
    assert assert_exact(queue) == {"active": 0, "deferred": 1, "hold": 0}


def test_zero_rows_do_not_accumulate(queue: Queue) -> None:
    queue.put_many([new(f"0{i}", f"a@d{i}.example") for i in range(5)])
    queue.delete(Selector(everything=True))
    queue.compact_counts()
    with queue.engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM queue_counts WHERE n <> 0")).scalar()
    assert left == 0
    if queue.engine.dialect.name == "sqlite":
        with queue.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM queue_counts")).scalar() == 0


def test_oldest_received_at(queue: Queue) -> None:
    assert queue.oldest_received_at() is None
    queue.put_many([new("02", at=T0 + timedelta(hours=1)), new("01", at=T0)])
    queue.hold(Selector(ids=("01",)))  # held mail is still queued mail
    assert queue.oldest_received_at() == T0
    queue.delete(Selector(ids=("01",)))
    assert queue.oldest_received_at() == T0 + timedelta(hours=1)


def test_scrape_queries_use_indexes_not_scans(tmp_path: Path) -> None:
    engine = db.connect(f"sqlite:///{tmp_path}/q.db")
    db.upgrade(engine)
    with engine.connect() as conn:
        plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT min(received_at) FROM messages"))
    engine.dispose()
    assert "ix_messages_received_at" in plan, plan


def test_ping(queue: Queue, tmp_path: Path) -> None:
    queue.ping()
    gone = Queue(create_engine(f"sqlite:///{tmp_path}/missing/dir/q.db"))
    with pytest.raises(QueueError):
        gone.ping()
    with pytest.raises(QueueError):
        gone.counts()
    gone.engine.dispose()


def test_concurrent_writers_keep_counts_exact(queue: Queue) -> None:
    """Several relays on one queue: puts, claims and records racing (and, on
    PostgreSQL, compaction) neither deadlock nor lose a count."""
    errors: list[BaseException] = []
    domains = ["d0.example", "d1.example", "d2.example", "d3.example"]

    def work(worker: int) -> None:
        try:
            for i in range(15):
                order = domains[worker % 4:] + domains[:worker % 4]  # lock orders differ
                queue.put_many([new(f"W{worker}-{i}", *(f"u@{d}" for d in order))])
                for c in queue.claim_due(f"n{worker}", T0 + timedelta(hours=1), 4, 60):
                    status = RecipientStatus.DEFERRED if i % 2 else RecipientStatus.DELIVERED
                    queue.record(Attempt(message_id=c.id, owner=f"n{worker}",
                                         lease_until=c.lease_until, at=T0,
                                         next_attempt_at=T0, recipients=outcome(c, status)))
                queue.compact_counts()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert errors == []
    assert_exact(queue)
    queue.compact_counts()
    assert_exact(queue)


# -- randomised: any sequence of operations keeps counts == GROUP BY ----------------

DOMAINS = ("verrotech.com", "other.example", "third.example")


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="relay-counts-")
        self.engine = db.connect(f"sqlite:///{self.dir}/q.db")
        db.upgrade(self.engine)
        self.queue = Queue(self.engine)
        self.now = T0
        self.serial = 0
        self.claimed: dict[str, tuple[str, Claimed]] = {}  # id -> (owner, claim)

    def teardown(self) -> None:
        self.engine.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(rcpts=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(DOMAINS)),
                         min_size=1, max_size=4),
          batch=st.integers(1, 3))
    def put(self, rcpts: list[tuple[str, str]], batch: int) -> None:
        msgs = []
        for _ in range(batch):
            self.serial += 1
            addresses = tuple(dict.fromkeys(f"{u}@{d}" for u, d in rcpts))
            msgs.append(new(f"M{self.serial:04d}", *addresses, at=self.now))
        self.queue.put_many(msgs)

    @rule(limit=st.integers(1, 5), owner=st.sampled_from(["n1", "n2"]))
    def claim(self, limit: int, owner: str) -> None:
        for c in self.queue.claim_due(owner, self.now, limit=limit, lease=60):
            self.claimed[c.id] = (owner, c)

    @rule(data=st.data())
    def claim_ids(self, data: st.DataObject) -> None:
        ids = [v.id for v in self.queue.list()]
        if ids:
            pick = data.draw(st.lists(st.sampled_from(ids), max_size=3, unique=True))
            for c in self.queue.claim_ids(pick, "n1", self.now, lease=60):
                self.claimed[c.id] = ("n1", c)

    @precondition(lambda self: bool(self.claimed))
    @rule(data=st.data(), status=st.sampled_from(list(RecipientStatus)[1:]),
          dsn=st.booleans(), down=st.booleans())
    def record(self, data: st.DataObject, status: RecipientStatus, dsn: bool,
               down: bool) -> None:
        qid = data.draw(st.sampled_from(sorted(self.claimed)))
        owner, c = self.claimed.pop(qid)
        dsns: tuple[NewMessage, ...] = ()
        if dsn:
            self.serial += 1
            dsns = (new(f"D{self.serial:04d}", "s@sender.example", at=self.now, sender=""),)
        self.queue.record(Attempt(
            message_id=qid, owner=owner, lease_until=c.lease_until, at=self.now,
            next_attempt_at=None if down else self.now + timedelta(seconds=30),
            recipients=outcome(c, status), dsns=dsns,
            destination=DestinationUpdate(c.destination, AttemptOutcome.SITE_FAILURE if down
                                          else AttemptOutcome.DELIVERED,
                                          retry_at=self.now + timedelta(seconds=30))))

    @precondition(lambda self: bool(self.claimed))
    @rule(owner=st.sampled_from(["n1", "n2"]))
    def unclaim(self, owner: str) -> None:
        ids = [qid for qid, (o, _) in self.claimed.items() if o == owner]
        self.queue.unclaim(ids, owner, self.now)
        for qid in ids:
            self.claimed.pop(qid)

    @rule(owner=st.sampled_from(["n1", "n2"]))
    def recover(self, owner: str) -> None:
        self.queue.recover(owner, self.now)
        self.claimed = {k: v for k, v in self.claimed.items() if v[0] != owner}

    @rule(verb=st.sampled_from(["hold", "release", "delete", "flush"]),
          domain=st.sampled_from(DOMAINS), everything=st.booleans())
    def operator(self, verb: str, domain: str, everything: bool) -> None:
        selector = Selector(everything=True) if everything else Selector(domain=domain)
        if verb == "hold":
            self.queue.hold(selector)
        elif verb == "release":
            self.queue.release(selector, self.now)
        elif verb == "delete":
            self.queue.delete(selector)
        else:
            self.queue.flush(selector, self.now)

    @rule(seconds=st.integers(0, 120))
    def tick(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)
        self.queue.start_probes(self.now, stale_before=self.now - timedelta(minutes=5))

    @invariant()
    def counts_match_a_full_scan(self) -> None:
        by_state, by_dest = truth(self.queue)
        assert self.queue.counts() == by_state
        assert self.queue.counts_by_destination() == by_dest


QueueMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None
)
TestQueueCounts = QueueMachine.TestCase


# -- the registry ---------------------------------------------------------------------


def families(body: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(body)}


def sample(fams: dict[str, Any], family: str, name: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == name and s.labels == labels:
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_metric_table_is_the_spec_plus_additions() -> None:
    for name, (kind, labels) in SPEC_METRICS.items():
        assert METRICS[name] == (kind, tuple(sorted(labels)))


def test_facade_methods_feed_their_metrics() -> None:
    from prometheus_client import generate_latest

    m = Metrics()
    m.accepted()
    m.accepted(2)
    m.rejected("relay_denied")
    m.session_started()
    m.session_started()
    m.session_ended()
    m.delivery("delivered", 0.2)
    m.delivery(RecipientStatus.BOUNCED.value)
    m.observe_delivery(3.0)
    m.destination("verrotech.com", State.DOWN)
    with pytest.raises(ValueError):
        m.delivery("exploded", 1.0)
    fams = families(generate_latest(m.registry).decode())
    assert "relay_queue_messages" not in fams  # no queue given
    assert sample(fams, "relay_smtp_messages_accepted",
                  "relay_smtp_messages_accepted_total") == 3
    assert sample(fams, "relay_smtp_rejections", "relay_smtp_rejections_total",
                  reason="relay_denied") == 1
    assert sample(fams, "relay_smtp_sessions_active", "relay_smtp_sessions_active") == 1
    attempts = "relay_delivery_attempts_total"
    assert sample(fams, "relay_delivery_attempts", attempts, result="delivered") == 1
    assert sample(fams, "relay_delivery_attempts", attempts, result="bounced") == 1
    assert sample(fams, "relay_delivery_attempts", attempts, result="deferred") == 0
    assert sample(fams, "relay_delivery_duration_seconds",
                  "relay_delivery_duration_seconds_count") == 2
    assert sample(fams, "relay_destination_up", "relay_destination_up",
                  destination="verrotech.com") == 0


def test_a_shared_queue_labels_per_process_series_with_the_node_not_the_queue_gauges(
    queue: Queue,
) -> None:
    from prometheus_client import generate_latest

    m = Metrics(queue, FakeClock(T0), nodes=queue, node="node2.verrotech.net")
    m.accepted()
    m.rejected("relay_denied")
    m.session_started()
    m.delivery("delivered", 0.2)
    m.recipient_checked("valid")
    m.destination("verrotech.com", State.UP)
    queue.put_many([new("01")])
    fams = families(generate_latest(m.registry).decode())
    node = "node2.verrotech.net"
    assert sample(fams, "relay_smtp_messages_accepted",
                  "relay_smtp_messages_accepted_total", node=node) == 1
    assert sample(fams, "relay_delivery_attempts", "relay_delivery_attempts_total",
                  result="deferred", node=node) == 0  # exported from 0, labelled too
    assert sample(fams, "relay_destination_up", "relay_destination_up",
                  destination="verrotech.com", node=node) == 1
    for name in PER_PROCESS:
        family = fams[name.removesuffix("_total")]
        assert family.samples, name
        assert all(s.labels["node"] == node for s in family.samples), name
    for name in ("relay_queue_messages", "relay_queue_oldest_message_age_seconds",
                 "relay_queue_database_up", "relay_nodes_up"):  # the cluster's, not ours
        assert fams[name].samples, name
        assert all("node" not in s.labels for s in fams[name].samples), name
    assert sample(fams, "relay_queue_messages", "relay_queue_messages", state="deferred") == 1


def test_registries_are_independent() -> None:
    from prometheus_client import generate_latest

    a, b = Metrics(), Metrics()
    a.accepted()
    fams = families(generate_latest(b.registry).decode())
    assert sample(fams, "relay_smtp_messages_accepted",
                  "relay_smtp_messages_accepted_total") == 0


def test_destination_series_expire_and_are_bounded() -> None:
    from prometheus_client import generate_latest

    clock = FakeClock(T0)
    m = Metrics(clock=clock, destination_ttl=3600, destination_limit=3)
    m.destination("old.example", State.UP)
    clock.advance(1800)
    for name in ("a.example", "b.example", "c.example"):
        m.destination(name, State.UP)
    m.destination("a.example", State.DOWN)  # refreshed: now the most recent
    fams = families(generate_latest(m.registry).decode())
    seen = {s.labels["destination"]: s.value for s in fams["relay_destination_up"].samples}
    assert seen == {"a.example": 0, "b.example": 1, "c.example": 1}  # old one evicted
    clock.advance(3601)
    m.destination("b.example", State.UP)
    fams = families(generate_latest(m.registry).decode())
    assert [s.labels["destination"] for s in fams["relay_destination_up"].samples] == [
        "b.example"]


def test_queue_gauges_are_read_from_the_database_at_scrape_time(queue: Queue) -> None:
    from prometheus_client import generate_latest

    clock = FakeClock(T0 + timedelta(minutes=10))
    m = Metrics(queue, clock)
    other = Metrics(Queue(queue.engine), clock)  # another process sharing the queue
    fams = families(generate_latest(m.registry).decode())
    for state in STATES:
        assert sample(fams, "relay_queue_messages", "relay_queue_messages", state=state) == 0
    assert sample(fams, "relay_queue_oldest_message_age_seconds",
                  "relay_queue_oldest_message_age_seconds") == 0
    queue.put_many([new("01", "a@verrotech.com", "b@other.example"), new("02")])
    queue.hold(Selector(ids=("02",)))
    for registry in (m.registry, other.registry):
        fams = families(generate_latest(registry).decode())
        assert sample(fams, "relay_queue_messages", "relay_queue_messages",
                      state="deferred") == 2
        assert sample(fams, "relay_queue_messages", "relay_queue_messages", state="hold") == 1
        assert sample(fams, "relay_queue_oldest_message_age_seconds",
                      "relay_queue_oldest_message_age_seconds") == 600
        assert sample(fams, "relay_queue_database_up", "relay_queue_database_up") == 1


def test_unreadable_database_drops_queue_gauges_not_the_scrape(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import generate_latest

    gone = Queue(create_engine(f"sqlite:///{tmp_path}/missing/dir/q.db"))
    m = Metrics(gone)
    m.accepted()
    fams = families(generate_latest(m.registry).decode())
    gone.engine.dispose()
    assert "relay_queue_messages" not in fams
    assert sample(fams, "relay_queue_database_up", "relay_queue_database_up") == 0
    assert sample(fams, "relay_smtp_messages_accepted",
                  "relay_smtp_messages_accepted_total") == 1
    assert "queue database unreadable" in caplog.text


# -- the HTTP endpoint ------------------------------------------------------------------


async def http(port: int, raw: bytes, *, half_close: bool = False
               ) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if half_close:
            writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: relay\r\nUser-Agent: t\r\n\r\n".encode()


class Endpoint:
    def __init__(self, server: asyncio.Server, metrics: Metrics) -> None:
        self.server = server
        self.metrics = metrics
        self.port = server.sockets[0].getsockname()[1]
        self.healthy = True


@pytest.fixture
async def endpoint(queue: Queue) -> AsyncIterator[Endpoint]:
    metrics = Metrics(queue, FakeClock(T0 + timedelta(minutes=1)))
    state: dict[str, Endpoint] = {}
    health = HealthCheck(lambda: state["e"].healthy, queue.ping)
    server = await start_http(HostPort("127.0.0.1", 0), metrics.registry, health,
                              read_timeout=0.5)
    state["e"] = Endpoint(server, metrics)
    try:
        yield state["e"]
    finally:
        server.close()
        await server.wait_closed()
        health.close()


async def test_scrape_has_every_spec_metric_and_live_queue_depth(
    endpoint: Endpoint, queue: Queue
) -> None:
    endpoint.metrics.rejected("relay_denied")
    endpoint.metrics.destination("verrotech.com", State.UP)
    status, headers, body = await http(endpoint.port, get("/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    fams = families(body.decode())
    for name, (kind, labels) in SPEC_METRICS.items():
        family = fams[name.removesuffix("_total") if kind == "counter" else name]
        assert family.type == kind, name
        assert family.samples, name
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (name, s)
    results = {s.labels["result"] for s in fams["relay_delivery_attempts"].samples}
    assert results == {"delivered", "deferred", "bounced", "uncertain"}
    before = sample(fams, "relay_queue_messages", "relay_queue_messages", state="deferred")

    await asyncio.to_thread(queue.put_many, [new("01", "a@verrotech.com", "b@other.example")])
    fams = families((await http(endpoint.port, get("/metrics")))[2].decode())
    assert sample(fams, "relay_queue_messages", "relay_queue_messages",
                  state="deferred") == before + 2
    assert sample(fams, "relay_queue_oldest_message_age_seconds",
                  "relay_queue_oldest_message_age_seconds") == 60


async def test_scrape_has_no_created_series(endpoint: Endpoint) -> None:
    endpoint.metrics.accepted()
    endpoint.metrics.observe_delivery(0.2)
    _, _, body = await http(endpoint.port, get("/metrics"))
    assert b"relay_smtp_messages_accepted_total 1.0" in body
    assert b"_created" not in body


async def test_concurrent_scrapes_all_answer(endpoint: Endpoint) -> None:
    answers = await asyncio.gather(*(http(endpoint.port, get("/metrics")) for _ in range(10)))
    assert {status for status, _, _ in answers} == {200}


async def test_head_gives_headers_only(endpoint: Endpoint) -> None:
    status, headers, body = await http(endpoint.port, get("/metrics", "HEAD"))
    assert status == 200 and body == b"" and int(headers["content-length"]) > 100
    status, headers, body = await http(endpoint.port, get("/healthz", "HEAD"))
    assert status == 200 and body == b"" and headers["content-length"] == "3"


async def test_healthz(endpoint: Endpoint) -> None:
    status, headers, body = await http(endpoint.port, get("/healthz"))
    assert (status, body) == (200, b"ok\n")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    endpoint.healthy = False
    status, _, body = await http(endpoint.port, get("/healthz"))
    assert (status, body) == (503, b"smtp listener is not up\n")


async def test_healthz_503_when_the_database_is_gone(tmp_path: Path) -> None:
    gone = Queue(create_engine(f"sqlite:///{tmp_path}/missing/dir/q.db"))
    health = HealthCheck(lambda: True, gone.ping)
    server = await start_http(HostPort("127.0.0.1", 0), Metrics().registry, health)
    try:
        status, _, body = await http(server.sockets[0].getsockname()[1], get("/healthz"))
    finally:
        server.close()
        await server.wait_closed()
        health.close()
        gone.engine.dispose()
    assert status == 503
    assert body.startswith(b"database unreachable: unable to open database file")


async def test_healthz_503_when_the_database_hangs() -> None:
    gate = threading.Event()
    calls = []

    def ping() -> None:
        calls.append(1)
        if len(calls) == 1:
            gate.wait(5)  # the first ping hangs until released

    health = HealthCheck(lambda: True, ping, timeout=0.1)
    started = time.monotonic()
    assert await health() == (False, "database did not answer within 0.1s")
    assert await health() == (False, "database did not answer within 0.1s")
    assert time.monotonic() - started < 1
    assert len(calls) == 1  # the second check waited on the same ping: no thread pile-up
    gate.set()
    deadline = time.monotonic() + 5
    verdict = await health()  # may still share the first ping, now ending
    while len(calls) < 2:  # until a check starts a fresh ping
        assert time.monotonic() < deadline, "the hung ping never ended"
        verdict = await health()
    assert verdict == (True, "ok")
    assert len(calls) == 2
    health.close()


@pytest.mark.parametrize(("raw", "status"), [
    (get("/"), 404),
    (get("/metrics/extra"), 404),
    (get("/metrics?name[]=relay_queue_messages"), 200),  # query ignored
    (get("/metrics", "POST"), 405),
    (get("/healthz", "DELETE"), 405),
    (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET /metrics HTTP/1.0\r\n\r\n", 200),  # 1.0 needs none
    (b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"G\xc3\x89T /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS hello
])
async def test_request_parsing(endpoint: Endpoint, raw: bytes, status: int) -> None:
    assert (await http(endpoint.port, raw))[0] == status
    assert (await http(endpoint.port, get("/healthz")))[0] == 200  # still serving


async def test_oversized_request_head_is_refused(endpoint: Endpoint) -> None:
    huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    assert (await http(endpoint.port, huge))[0] in (400, 431)
    many = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: aaaaaaaaaa\r\n" * 1000 + b"\r\n"
    assert (await http(endpoint.port, many))[0] in (400, 431)


async def raw_exchange(port: int, raw: bytes, *, half_close: bool = False) -> bytes:
    """Everything the server sends before it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        if half_close:
            writer.write_eof()
        try:
            return await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)


async def test_slow_or_truncated_clients_do_not_hold_the_server(endpoint: Endpoint) -> None:
    started = time.monotonic()
    # The head never ends: the connection is closed at read_timeout (0.5 s), unanswered.
    assert await raw_exchange(endpoint.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n") == b""
    assert time.monotonic() - started < 3
    truncated = await raw_exchange(endpoint.port, b"GET /metrics HTTP/1.1\r\nHo", half_close=True)
    assert not truncated.startswith(b"HTTP/1.1 200")
    assert (await http(endpoint.port, get("/healthz")))[0] == 200


async def test_connection_cap(queue: Queue) -> None:
    health = HealthCheck(lambda: True, queue.ping)
    server = await start_http(HostPort("127.0.0.1", 0), Metrics().registry, health,
                              read_timeout=2, max_connections=2)
    port = server.sockets[0].getsockname()[1]
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        # Once the server has taken the two idle connections in, a third is
        # dropped unanswered, at once; until then it may still be served.
        deadline = time.monotonic() + 5
        while True:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get("/healthz"))
            try:
                data = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:
                data = b""
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
            if data == b"":
                break
            assert data.startswith(b"HTTP/1.1 200 ")
            assert time.monotonic() < deadline, "a third connection was never dropped"
    finally:
        for _, w in idle:
            w.close()
            await asyncio.gather(w.wait_closed(), return_exceptions=True)
        server.close()
        await server.wait_closed()
        health.close()


# -- dashboards and alerts only name metrics that exist ---------------------------------

_METRIC_NAME = re.compile(r"\brelay_[a-z0-9_]+")


def exported_names() -> set[str]:
    names = set()
    for name, (kind, _) in METRICS.items():
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def test_grafana_dashboard_references_only_real_metrics() -> None:
    dashboard = json.loads((ROOT / "config/grafana-dashboard.json").read_text())
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    assert dashboard["title"] and dashboard["panels"]
    used = {m for e in exprs for m in _METRIC_NAME.findall(e)}
    assert used <= exported_names(), used - exported_names()
    assert {n.removesuffix("_bucket") for n in used} >= set(SPEC_METRICS)  # all shown


def test_alert_rules_reference_only_real_metrics() -> None:
    source = (ROOT / "config/prometheus-alerts.yml").read_text()
    used = set(_METRIC_NAME.findall(source))
    assert used <= exported_names(), used - exported_names()
    for needed in ("relay_queue_messages", "relay_queue_oldest_message_age_seconds",
                   "relay_delivery_attempts_total", "relay_destination_up"):
        assert needed in used
    assert re.search(r"\bup(\{[^}]*\})?\s*==\s*0", source)  # relay down


def test_alert_rules_are_valid_rule_groups() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / "config/prometheus-alerts.yml").read_text())
    names = set()
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations",
                              "keep_firing_for"}
            assert r["alert"] not in names
            names.add(r["alert"])
            assert r["expr"].strip() and r["labels"]["severity"] in ("warning", "critical")
            assert r["annotations"]["summary"]
