"""Every Prometheus metric of the relay, in one place, on its own registry.

Owns the metric names, types, labels and help texts (SPEC "Metrics"), and
the `Metrics` facade the rest of the code calls (`accepted()`,
`rejected(reason)`, `session_started()`, `delivery(result, seconds)`,
`destination(name, up)`...), so no other module touches a prometheus object.
Queue gauges are not kept in memory: a collector reads them from the database
at scrape time (`Queue.counts()`, `Queue.oldest_received_at()`, both cheap
whatever the queue length), so every process sharing one queue reports the
same depth. Series that are this process's own figures (`PER_PROCESS`:
sessions, acceptances, refusals, checks, attempts, durations, destination
states as this process saw them) carry a `node` label (its `node.hostname`)
when the `Metrics` is given one, as `relay serve` does on a PostgreSQL queue
that several nodes may share; queue gauges and `relay_nodes_up` are the
cluster's and never carry it. On SQLite (one node) the series stay unlabelled.

Refuses the global registry (tests build several `Metrics`), HTTP (that is
`http.py`) and any write to the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.core.clock import Clock, SystemClock
from relay.core.destination import State
from relay.core.model import ATTEMPT_RESULTS, MessageState, Outcome

log = logging.getLogger(__name__)

_M = TypeVar("_M", Counter, Gauge, Histogram)

# No `*_created` series: one more series per counter and histogram that no
# dashboard or alert reads. A switch of prometheus_client's, read when a metric
# is made, so it is set here, before any is.
disable_created_metrics()

QUEUE_MESSAGES = "relay_queue_messages"
QUEUE_OLDEST_AGE = "relay_queue_oldest_message_age_seconds"
QUEUE_DATABASE_UP = "relay_queue_database_up"
SMTP_ACCEPTED = "relay_smtp_messages_accepted_total"
SMTP_REJECTIONS = "relay_smtp_rejections_total"
SMTP_SESSIONS = "relay_smtp_sessions_active"
DELIVERY_ATTEMPTS = "relay_delivery_attempts_total"
DELIVERY_DURATION = "relay_delivery_duration_seconds"
DESTINATION_UP = "relay_destination_up"
RECIPIENT_CHECKS = "relay_recipient_checks_total"
RECIPIENT_CHECK_RESULTS = ("valid", "invalid", "unknown", "static")
CALLOUTS = "relay_callouts_total"
CALLOUT_RESULTS = ("valid", "invalid", "unknown")
NODES_UP = "relay_nodes_up"
DSN_SUPPRESSED = "relay_dsn_suppressed_total"
SUPPRESSING_RESULTS = ("fail", "softfail", "neutral", "none", "temperror", "permerror")

# name -> (type, label names): what /metrics exports; tests and the Grafana
# dashboard check themselves against this table.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    QUEUE_MESSAGES: ("gauge", ("state",)),
    QUEUE_OLDEST_AGE: ("gauge", ()),
    QUEUE_DATABASE_UP: ("gauge", ()),
    SMTP_ACCEPTED: ("counter", ()),
    SMTP_REJECTIONS: ("counter", ("reason",)),
    SMTP_SESSIONS: ("gauge", ()),
    DELIVERY_ATTEMPTS: ("counter", ("result",)),
    DELIVERY_DURATION: ("histogram", ()),
    DESTINATION_UP: ("gauge", ("destination",)),
    RECIPIENT_CHECKS: ("counter", ("result",)),
    CALLOUTS: ("counter", ("result",)),
    NODES_UP: ("gauge", ()),
    DSN_SUPPRESSED: ("counter", ("reason",)),
}

# Figures of one process (labelled `node` on a shared queue); the others are
# read from the database and are the same on every node.
PER_PROCESS = frozenset({SMTP_ACCEPTED, SMTP_REJECTIONS, SMTP_SESSIONS, DELIVERY_ATTEMPTS,
                         DELIVERY_DURATION, DESTINATION_UP, RECIPIENT_CHECKS, CALLOUTS,
                         DSN_SUPPRESSED})
NODE_LABEL = "node"

# An SMTP delivery takes from tens of milliseconds to the connect timeout
# plus a 35 MB transfer.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class QueueCounts(Protocol):
    """What the queue collector needs of `relay.queue.access.Queue` (blocking calls)."""

    def counts(self) -> dict[str, int]: ...

    def oldest_received_at(self) -> datetime | None: ...


class NodeCounts(Protocol):
    """What the nodes collector needs of the queue (a blocking call)."""

    def nodes_up(self, now: datetime) -> int: ...


def _base(name: str) -> str:
    """prometheus_client appends `_total` to counters itself."""
    return name.removesuffix("_total")


class QueueCollector(Collector):
    """Queue depth and oldest age, read from the database on every scrape.

    A database that does not answer drops the two queue gauges from that
    scrape and sets `relay_queue_database_up` to 0: the rest still exports,
    so the relay does not look down because its database is.
    """

    def __init__(self, queue: QueueCounts, clock: Clock) -> None:
        self._queue = queue
        self._clock = clock

    def describe(self) -> Iterable[Metric]:  # keeps registration off the database
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(QUEUE_MESSAGES, "Messages in the queue, by state.", labels=["state"]),
            GaugeMetricFamily(
                QUEUE_OLDEST_AGE,
                "Age of the oldest message in the queue, in seconds; 0 when empty.",
            ),
            GaugeMetricFamily(
                QUEUE_DATABASE_UP, "1 when the queue database answered this scrape, else 0."
            ),
        ]

    def collect(self) -> Iterator[Metric]:
        depth, oldest_age, database_up = self._families()
        try:
            counts = self._queue.counts()
            oldest = self._queue.oldest_received_at()
        except Exception as exc:  # QueueError, or whatever a broken driver raises
            log.warning("metrics: queue database unreadable: %s", exc)
            database_up.add_metric([], 0.0)
            yield database_up
            return
        for state in MessageState:
            depth.add_metric([state.value], float(counts.get(state.value, 0)))
        known = {state.value for state in MessageState}
        for name, n in sorted(counts.items()):
            if name not in known:  # a state this version does not know: show it anyway
                depth.add_metric([name], float(n))
        age = 0.0 if oldest is None else (self._clock.now() - oldest).total_seconds()
        oldest_age.add_metric([], max(0.0, age))
        database_up.add_metric([], 1.0)
        yield depth
        yield oldest_age
        yield database_up


class NodesCollector(Collector):
    """`relay_nodes_up`: the nodes sharing this queue whose heartbeat holds,
    read from the database on every scrape (the same figure on every node).
    A database that does not answer drops it from that scrape."""

    def __init__(self, nodes: NodeCounts, clock: Clock) -> None:
        self._nodes = nodes
        self._clock = clock

    def describe(self) -> Iterable[Metric]:  # keeps registration off the database
        return [self._family()]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            NODES_UP, "Nodes (relay serve processes) sharing this queue, seen within one lease."
        )

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        try:
            up = self._nodes.nodes_up(self._clock.now())
        except Exception as exc:  # the queue collector says it too, with database_up
            log.debug("metrics: nodes unreadable: %s", exc)
            return
        family.add_metric([], float(up))
        yield family


class DestinationCollector(Collector):
    """`relay_destination_up{destination}` as this process last saw it.

    Destinations include every sender domain a bounce went to, so a series not
    updated for `ttl` seconds is dropped (a down destination is probed at least
    once per max_backoff, which keeps it fresh), and at most `limit` are kept.
    """

    def __init__(self, clock: Clock, ttl: float, limit: int, node: str | None = None) -> None:
        self._clock = clock
        self._node = node
        self._ttl = ttl
        self._limit = limit
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[bool, datetime]] = {}

    def set(self, name: str, up: bool) -> None:
        with self._lock:
            self._seen.pop(name, None)  # re-insert: dict order is least recently set first
            self._seen[name] = (up, self._clock.now())
            while len(self._seen) > self._limit:
                del self._seen[next(iter(self._seen))]

    def forget(self, name: str) -> None:
        with self._lock:
            self._seen.pop(name, None)

    def snapshot(self) -> dict[str, bool]:
        now = self._clock.now()
        with self._lock:
            for name in [
                n for n, (_, at) in self._seen.items() if (now - at).total_seconds() > self._ttl
            ]:
                del self._seen[name]
            return {name: up for name, (up, _) in self._seen.items()}

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            DESTINATION_UP,
            "1 when the destination's last delivery attempt reached a next hop, 0 when down.",
            labels=["destination", *([NODE_LABEL] if self._node else [])],
        )

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        node = [self._node] if self._node else []
        for name, up in sorted(self.snapshot().items()):
            family.add_metric([name, *node], 1.0 if up else 0.0)
        yield family


class Metrics:
    """The relay's metrics; the only object other modules call.

    `queue` is optional: without it (unit tests, tools) the queue gauges are
    simply absent. `node` (this node's hostname) labels the `PER_PROCESS`
    series. Every method is cheap and thread-safe.
    """

    def __init__(
        self,
        queue: QueueCounts | None = None,
        clock: Clock | None = None,
        *,
        destination_ttl: float = 24 * 3600,
        destination_limit: int = 10_000,
        nodes: NodeCounts | None = None,
        node: str | None = None,
    ) -> None:
        self.clock = clock or SystemClock()
        self.node = node or None
        by_node = [NODE_LABEL] if self.node else []
        self.registry = CollectorRegistry()
        if queue is not None:
            self.registry.register(QueueCollector(queue, self.clock))
        if nodes is not None:
            self.registry.register(NodesCollector(nodes, self.clock))
        accepted = Counter(
            _base(SMTP_ACCEPTED),
            "Messages answered 250 at end of DATA (stored durably).",
            by_node,
            registry=self.registry,
        )
        self._accepted = self._own(accepted)
        self._rejections = Counter(
            _base(SMTP_REJECTIONS),
            "SMTP commands or connections refused, by reason.",
            ["reason", *by_node],
            registry=self.registry,
        )
        sessions = Gauge(
            SMTP_SESSIONS, "SMTP sessions currently open.", by_node, registry=self.registry
        )
        self._sessions = self._own(sessions)
        self._attempts = Counter(
            _base(DELIVERY_ATTEMPTS),
            "Delivery results per recipient attempt: delivered, deferred, uncertain or bounced.",
            ["result", *by_node],
            registry=self.registry,
        )
        # export 0 before the first attempt: rate() works at once
        self._results = {o.value: self._own(self._attempts, o.value) for o in ATTEMPT_RESULTS}
        duration = Histogram(
            DELIVERY_DURATION,
            "Duration of one delivery attempt (one message to one next hop), in seconds.",
            by_node,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._duration = self._own(duration)
        self._recipient_checks = Counter(
            _base(RECIPIENT_CHECKS),
            "RCPT TO checks of hosted recipients: valid, invalid or unknown (learned), or static.",
            ["result", *by_node],
            registry=self.registry,
        )
        self._checks = {r: self._own(self._recipient_checks, r) for r in RECIPIENT_CHECK_RESULTS}
        callouts = Counter(
            _base(CALLOUTS),
            "Callout probes to a next hop at RCPT time, by what they taught: valid, invalid "
            "or unknown.",
            ["result", *by_node],
            registry=self.registry,
        )
        self._callouts = {r: self._own(callouts, r) for r in CALLOUT_RESULTS}
        self._suppressed = Counter(
            _base(DSN_SUPPRESSED),
            "DSNs not queued because of bounces.send_to, by reason (spf-<result>).",
            ["reason", *by_node],
            registry=self.registry,
        )
        for result in SUPPRESSING_RESULTS:  # exported from 0: rate() works at once
            self._own(self._suppressed, f"spf-{result}")
        self._destinations = DestinationCollector(self.clock, destination_ttl, destination_limit,
                                                  self.node)
        self.registry.register(self._destinations)

    def _own(self, metric: _M, *labels: str) -> _M:
        """The series of `metric` with `labels`, and this node's label when it has one."""
        values = [*labels, *([self.node] if self.node else [])]
        return metric.labels(*values) if values else metric

    # -- SMTP accept side ------------------------------------------------------

    def accepted(self, messages: int = 1) -> None:
        """A message was stored and answered 250."""
        self._accepted.inc(messages)

    def rejected(self, reason: str) -> None:
        """A refusal; `reason` is a short fixed token (`relay_denied`, `rate_limit`...),
        never client text: every distinct value is a time series."""
        self._own(self._rejections, reason).inc()

    def recipient_checked(self, result: str) -> None:
        """One RCPT TO checked against known recipients or a static list."""
        self._checks[result].inc()

    def callout(self, result: str) -> None:
        """One callout probe ended (`verify = "callout"`)."""
        self._callouts[result].inc()

    def session_started(self) -> None:
        self._sessions.inc()

    def session_ended(self) -> None:
        self._sessions.dec()

    # -- delivery side -----------------------------------------------------------

    def delivery(self, result: Outcome | str, seconds: float | None = None) -> None:
        """One recipient's attempt ended `result`; `seconds` (when given) feeds the
        duration histogram, so pass it once per attempt, not once per recipient."""
        value = Outcome(result)
        if value not in ATTEMPT_RESULTS:  # bounded labels: an expiry is counted as bounced
            raise ValueError(f"not a delivery result: {value}")
        self._results[value.value].inc()
        if seconds is not None:
            self.observe_delivery(seconds)

    def observe_delivery(self, seconds: float) -> None:
        """How long one delivery attempt (one session to a next hop) took."""
        self._duration.observe(max(0.0, seconds))

    def dsn_suppressed(self, spf_result: str) -> None:
        """A DSN withheld by `bounces.send_to = "spf-pass"`; seven results at most."""
        self._own(self._suppressed, f"spf-{spf_result}").inc()

    def destination(self, name: str, state: State) -> None:
        """The destination's state after an attempt that tested its hosts."""
        self._destinations.set(name, state is State.UP)

    def forget_destination(self, name: str) -> None:
        self._destinations.forget(name)
