"""Several `relay serve` processes on one PostgreSQL queue (SPEC Part 2).

Three real relays share a fresh database of the session's private PostgreSQL:
node 1 is mail.verrotech.net (MX 20 of the reference zone), nodes 2 and 3
are hosts of their own that no MX names. All three start at the same
instant on the empty database, or on one at an older revision (migrations
serialised). 1,000 messages are accepted
across the nodes while the primary (MX 10) is down; then the primary comes
back, and each is delivered once, or (five kill -9 rounds) at most twice if
it was in flight at a killed node.
Loop avoidance counts the other nodes as this one, so nodes 2 and 3 never
hand mail to node 1 (MX 20) or to Norwich (MX 30).
"""

from __future__ import annotations

import json
import re
import smtplib
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.deployment import NORWICH, PRIMARY, RELAY, Deployment, message, to_toml
from tests.support.relay_process import READY, RelayProcess, free_port
from tests.support.smtp_sink import ReceivedMessage

pytestmark = pytest.mark.slow

HOSTS = (("mail.verrotech.net", RELAY), ("node2.verrotech.net", "127.0.0.6"),
         ("node3.verrotech.net", "127.0.0.7"))
LEASE = 3.0
TOTAL = 1000
ROUNDS = 5
TOOK_OVER = "took over [0-9]+ deliveries"


class Cluster:
    def __init__(self, deployment: Deployment, url: str, tmp_path: Path,
                 concurrency: int = 10) -> None:
        self.deployment = deployment
        self.ports = [free_port(host) for _, host in HOSTS]
        self.metrics_ports = [free_port(host) for _, host in HOSTS]
        self.relays: list[RelayProcess] = []
        for n, ((hostname, host), port) in enumerate(zip(HOSTS, self.ports, strict=True)):
            settings: dict[str, Any] = json.loads(json.dumps(deployment.settings))
            settings["node"] = {"hostname": hostname}
            settings["smtp"] = {"listen": [f"{host}:{port}"]}
            settings["metrics"] = {"listen": f"{host}:{self.metrics_ports[n]}"}
            settings["queue"] = {"url": url, "lease": f"{LEASE:g}s"}
            settings["delivery"] |= {"concurrency": concurrency,
                                     "per_destination_concurrency": concurrency}
            config = tmp_path / f"node{n + 1}.toml"
            config.write_text(to_toml(settings))
            self.relays.append(deployment.relay_class(config))

    def start(self) -> None:
        """All at once on the empty database, then each waited for."""
        for relay in self.relays:
            relay.start(wait=False)
        for relay in self.relays:
            relay.wait_for("mx-relay ready", timeout=60)
        self.wait_for_peers()

    def wait_for_peers(self) -> None:
        """Until every node beat after all were ready, so each knows the others
        (loop avoidance); a node that knew none would hand mail to MX 30."""
        ready = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # `relay nodes` shows seconds
        deadline = time.monotonic() + 10 * LEASE
        while not all(n["last_seen_at"] > ready for n in self.nodes()):
            assert time.monotonic() < deadline, f"nodes did not beat since {ready}"

    def send(self, node: int, numbers: range) -> None:
        """One SMTP session to `node`, one message per number."""
        host = HOSTS[node][1]
        with smtplib.SMTP(host, self.ports[node], timeout=30) as client:
            client.ehlo("client.sender.example")
            for n in numbers:
                refused = client.sendmail("s@sender.example", ["alice@verrotech.com"], message(n))
                assert refused == {}

    def scrape(self, node: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Node `node`'s /metrics: (sample name, labels) -> value."""
        url = f"http://{HOSTS[node][1]}:{self.metrics_ports[node]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(body) for s in family.samples}

    def nodes(self) -> list[dict[str, Any]]:
        result = self.relays[0].cli("nodes", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]


    def relay_of(self, owner: str) -> RelayProcess:
        """The running relay whose process holds lease `owner` (`hostname/pid/random`)."""
        pid = int(owner.split("/")[1])
        [relay] = [r for r in self.relays if r.proc and r.proc.pid == pid]
        return relay


MakeCluster = Callable[..., Cluster]


@pytest.fixture
def make_cluster(deployment: Deployment, postgres_db_url: str,
                 tmp_path: Path) -> Iterator[MakeCluster]:
    """Clusters on the session's PostgreSQL, started unless `start=False`; all killed at the end."""
    made: list[Cluster] = []

    def make(concurrency: int = 10, start: bool = True) -> Cluster:
        cluster = Cluster(deployment, postgres_db_url, tmp_path, concurrency)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in made:
        for relay in cluster.relays:
            relay.stop_quietly()


@pytest.fixture
def cluster(make_cluster: MakeCluster) -> Cluster:
    return make_cluster()


def numbers_of(received: list[ReceivedMessage]) -> Counter[int]:
    """How often each message (by its `Subject: message N`) reached the primary."""
    found: Counter[int] = Counter()
    for m in received:
        subject = m.data.split(b"Subject: message ", 1)[1].split(b"\r\n", 1)[0]
        found[int(subject)] += 1
    return found


def accept_across_nodes(cluster: Cluster, total: int = TOTAL) -> int:
    """`total` messages, numbered, sent to the three nodes at once (one session each)."""
    failed: list[BaseException] = []

    def send(node: int) -> None:
        try:
            cluster.send(node, range(node, total, len(HOSTS)))
        except BaseException as exc:  # reported by the test's thread below
            failed.append(exc)

    senders = [threading.Thread(target=send, args=(n,)) for n in range(len(HOSTS))]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=120)
    assert not failed, failed
    wait_for_any(cluster, r"destination verrotech\.com is down", timeout=30)
    return total


def wait_for_any(cluster: Cluster, pattern: str, timeout: float) -> None:
    """The destination's state is the cluster's: the node whose attempt finds it
    down logs the transition, once, and the others' mail waits parked with it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for relay in cluster.relays:
            try:
                relay.wait_for(pattern, timeout=0.2)
            except AssertionError:
                continue
            return
    raise AssertionError(f"no node logged {pattern!r} within {timeout} s")


def test_three_nodes_deliver_each_message_once_when_the_primary_comes_back(
    cluster: Cluster, deployment: Deployment,
) -> None:
    norwich = deployment.sink(NORWICH)
    total = accept_across_nodes(cluster)
    listed = cluster.relays[1].queue_list()
    assert len(listed) == total  # one queue, whichever node is asked
    nodes = cluster.nodes()
    assert sorted(n["hostname"] for n in nodes) == sorted(h for h, _ in HOSTS)
    assert {n["pid"] for n in nodes} == {r.proc.pid for r in cluster.relays if r.proc}

    primary = deployment.sink(PRIMARY)
    primary.wait_until(lambda got: len(numbers_of(got)) == total, timeout=60)
    for relay in cluster.relays:
        relay.wait_for(r": delivered ", timeout=30)  # every node drained its share
    assert cluster.relays[2].queue_list() == []
    # One node's probe found the primary back and woke the others (NOTIFY).
    assert sum(r.count(r"verrotech\.com answers again") for r in cluster.relays) >= 1
    assert numbers_of(primary.messages) == Counter(range(total))  # each exactly once
    assert norwich.session_count == 0  # nobody handed mail to MX 30 ...
    for relay in cluster.relays:  # ... or to node 1 (MX 20), or looped
        assert "loops back" not in relay.log

    # Each node counts its own deliveries (labelled with its name); the queue
    # gauges are the cluster's, unlabelled, the same on every node.
    delivered = 0.0
    for node, (hostname, _) in enumerate(HOSTS):
        samples = cluster.scrape(node)
        mine = samples[("relay_delivery_attempts_total",
                        frozenset({("result", "delivered"), ("node", hostname)}))]
        assert mine > 0
        delivered += mine
        assert samples[("relay_queue_messages", frozenset({("state", "deferred")}))] == 0
        assert samples[("relay_nodes_up", frozenset())] == len(HOSTS)
    assert delivered == total


def test_nodes_killed_mid_drain_five_times_lose_nothing_and_are_taken_over_within_the_lease(
    make_cluster: MakeCluster, deployment: Deployment,
) -> None:
    """Each round kills -9 the node holding the most deliveries while the
    primary is slow to answer DATA (so every node has mail in flight), checks
    that a survivor takes its deliveries over within the lease + 5 s, and
    restarts it. The slow primary keeps the drain going for all five rounds."""
    cluster = make_cluster(concurrency=4)
    total = accept_across_nodes(cluster)
    primary = deployment.sink(PRIMARY)
    primary.data_delay = 1.0  # 12 deliveries in flight, at most 12 msg/s: 5 rounds fit
    held: list[int] = []
    took: list[float] = []
    for _ in range(ROUNDS):
        primary.wait_for_messages(primary.message_count + 4, timeout=30)  # mid-drain
        leased = Counter(m["node"] for m in cluster.relays[0].queue_list() if m["node"])
        running = {n for n in leased if int(n.split("/")[1]) in
                   {r.proc.pid for r in cluster.relays if r.proc and r.proc.poll() is None}}
        owner = max(running, key=lambda n: leased[n])
        victim = cluster.relay_of(owner)
        survivors = [r for r in cluster.relays if r is not victim]
        taken_before = sum(r.count(TOOK_OVER) for r in survivors)
        victim.kill()
        killed_at = time.monotonic()
        in_flight = [m["id"] for m in cluster.relays[0].queue_list() if m["node"] == owner]
        assert in_flight  # it died holding deliveries
        held.append(len(in_flight))
        wait_until_any(survivors, TOOK_OVER, taken_before + 1, timeout=LEASE + 5)
        took.append(time.monotonic() - killed_at)
        ready = victim.count(re.escape(READY))
        victim.start(wait=False)  # a fresh node id: the next round may pick it again
        victim.wait_for(re.escape(READY), count=ready + 1, timeout=30)
    assert primary.message_count < total, "the drain ended before the last round"
    primary.data_delay = 0.0
    primary.wait_until(lambda got: len(numbers_of(got)) == total, timeout=60)
    assert cluster.relays[0].queue_list() == []

    delivered = numbers_of(primary.messages)
    duplicates = sum(n - 1 for n in delivered.values())
    assert set(delivered) == set(range(total))  # nothing lost
    assert duplicates <= sum(held)
    print(f"killed nodes held {held} deliveries (sum {sum(held)}); {duplicates} delivered "
          f"twice; taken over {', '.join(f'{t:.1f}' for t in took)} s after each kill")


def wait_until_any(relays: list[RelayProcess], pattern: str, count: int, timeout: float) -> None:
    """Until the relays together logged `pattern` `count` times (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while sum(r.count(pattern) for r in relays) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{pattern!r} not logged {count} times within {timeout} s")
        for relay in relays:  # each waits for its next line (or a short while)
            try:
                relay.wait_for(pattern, count=relay.count(pattern) + 1, timeout=min(0.2, left))
            except AssertionError:
                continue


def test_nodes_started_together_on_an_older_database_migrate_it_once(
    make_cluster: MakeCluster, postgres_db_url: str,
) -> None:
    import relay.migrations
    from alembic import command
    from alembic.config import Config as AlembicConfig

    from relay.queue import db

    engine = db.connect(postgres_db_url)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(relay.migrations.__file__).parent))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    engine.dispose()
    cluster = make_cluster()  # all three at the same instant: none may fail
    current = cluster.relays[2].cli("db", "current")
    assert current.returncode == 0, current
    assert current.stdout.splitlines()[0].endswith("(head)"), current
    assert len(cluster.nodes()) == len(HOSTS)
    assert sum(r.count("migration failed") for r in cluster.relays) == 0


def test_two_instances_on_one_host_share_the_smtp_port_and_stop_on_sigterm(
    deployment: Deployment, postgres_db_url: str, tmp_path: Path,
) -> None:
    """The mx-relay@.service template: two nodes of one host, one config but
    for metrics, `smtp.reuse_port` on one address and port; the kernel spreads
    the connections over both. Without it a second relay on the port fails."""
    port = free_port(RELAY)
    relays = []
    for n in (1, 2):
        settings: dict[str, Any] = json.loads(json.dumps(deployment.settings))
        settings["smtp"] = {"listen": [f"{RELAY}:{port}"], "reuse_port": True}
        settings["queue"] = {"url": postgres_db_url}
        config = tmp_path / f"relay@{n}.toml"
        config.write_text(to_toml(settings))
        relays.append(deployment.relay_class(config).start(timeout=60))
    for n in range(40):  # one connection each: new source ports, spread by the kernel
        with smtplib.SMTP(RELAY, port, timeout=30) as client:
            assert client.sendmail("s@sender.example", ["alice@verrotech.com"], message(n)) == {}
    accepted = [r.count(r": queued client=") for r in relays]
    assert sum(accepted) == 40 and min(accepted) > 0, accepted
    assert len(relays[0].queue_list()) == 40

    settings["smtp"] = {"listen": [f"{RELAY}:{port}"]}  # reuse_port off: refused
    lone = tmp_path / "lone.toml"
    lone.write_text(to_toml(settings))
    refused = deployment.relay_class(lone).start(wait=False)
    assert refused.proc is not None and refused.proc.wait(timeout=60) != 0
    assert "cannot listen for SMTP on" in refused.log and "address already in use" in refused.log

    assert [r.terminate() for r in relays] == [0, 0]
