"""Several `relay serve` processes on one PostgreSQL queue (SPEC Part 2).

Three real relays share a fresh database of the session's private PostgreSQL:
node 1 is mail.verrotech.net (MX 20 of the reference zone), nodes 2 and 3
are hosts of their own that no MX names. All three start at the same
instant on the empty database, or on one at an older revision (migrations
serialised). Mail is accepted by
every node while the primary (MX 10) is down; then the primary comes back.
Loop avoidance counts the other nodes as this one, so nodes 2 and 3 never
hand mail to node 1 (MX 20) or to Norwich (MX 30).
"""

from __future__ import annotations

import json
import smtplib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.deployment import NORWICH, PRIMARY, RELAY, Deployment, message, to_toml
from tests.support.relay_process import RelayProcess, free_port
from tests.support.smtp_sink import ReceivedMessage

pytestmark = pytest.mark.slow

HOSTS = (("mail.verrotech.net", RELAY), ("node2.verrotech.net", "127.0.0.6"),
         ("node3.verrotech.net", "127.0.0.7"))
LEASE = 3.0
PER_NODE = 100


class Cluster:
    def __init__(self, deployment: Deployment, url: str, tmp_path: Path) -> None:
        self.deployment = deployment
        self.ports = [free_port(host) for _, host in HOSTS]
        self.relays: list[RelayProcess] = []
        for n, ((hostname, host), port) in enumerate(zip(HOSTS, self.ports, strict=True)):
            settings: dict[str, Any] = json.loads(json.dumps(deployment.settings))
            settings["node"] = {"hostname": hostname}
            settings["smtp"] = {"listen": [f"{host}:{port}"]}
            settings["queue"] = {"url": url, "lease": f"{LEASE:g}s"}
            settings["delivery"] |= {"concurrency": 10, "per_destination_concurrency": 10}
            config = tmp_path / f"node{n + 1}.toml"
            config.write_text(to_toml(settings))
            self.relays.append(deployment.relay_class(config))

    def start(self) -> None:
        """All at once on the empty database, then each waited for."""
        for relay in self.relays:
            relay.start(wait=False)
        for relay in self.relays:
            relay.wait_for("mx-relay ready", timeout=60)

    def send(self, node: int, numbers: range) -> None:
        """One SMTP session to `node`, one message per number."""
        host = HOSTS[node][1]
        with smtplib.SMTP(host, self.ports[node], timeout=30) as client:
            client.ehlo("client.sender.example")
            for n in numbers:
                refused = client.sendmail("s@sender.example", ["alice@verrotech.com"], message(n))
                assert refused == {}

    def nodes(self) -> list[dict[str, Any]]:
        result = self.relays[0].cli("nodes", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def cluster(deployment: Deployment, postgres_db_url: str, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(deployment, postgres_db_url, tmp_path)
    made.start()
    yield made
    for relay in made.relays:
        relay.stop_quietly()


def numbers_of(received: list[ReceivedMessage]) -> Counter[int]:
    """How often each message (by its `Subject: message N`) reached the primary."""
    found: Counter[int] = Counter()
    for m in received:
        subject = m.data.split(b"Subject: message ", 1)[1].split(b"\r\n", 1)[0]
        found[int(subject)] += 1
    return found


def accept_across_nodes(cluster: Cluster) -> int:
    for node in range(len(HOSTS)):
        cluster.send(node, range(node * PER_NODE, (node + 1) * PER_NODE))
    wait_for_any(cluster, r"destination verrotech\.com is down", timeout=30)
    return len(HOSTS) * PER_NODE


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


def test_a_node_killed_mid_drain_loses_nothing_and_is_taken_over_within_the_lease(
    cluster: Cluster, deployment: Deployment,
) -> None:
    total = accept_across_nodes(cluster)
    primary = deployment.sink(PRIMARY)
    primary.wait_for_messages(30, timeout=30)  # the probe answered: every node drains
    primary.hold_data()
    primary.wait_for_held(10, timeout=30)  # deliveries hang at DATA: in flight

    by_node = Counter(m["node"] for m in cluster.relays[0].queue_list() if m["node"])
    nodes = {n["id"]: n for n in cluster.nodes()}
    victim_id = max(by_node, key=lambda n: by_node[n])
    [victim] = [r for r in cluster.relays if r.proc and r.proc.pid == nodes[victim_id]["pid"]]
    victim.kill()
    killed_at = time.monotonic()
    in_flight = {m["id"] for m in cluster.relays[0].queue_list() if m["node"] == victim_id}
    assert in_flight  # it died holding deliveries

    primary.release_data()
    survivors = [r for r in cluster.relays if r is not victim]
    # Everything the victim held goes out again once its lease lapses.
    primary.wait_until(lambda got: len(numbers_of(got)) == total, timeout=LEASE + 5)
    taken_over_in = time.monotonic() - killed_at
    assert sum(r.count("took over [0-9]+ deliveries") for r in survivors) >= 1
    assert survivors[0].queue_list() == []

    delivered = numbers_of(primary.messages)
    duplicates = sum(n - 1 for n in delivered.values())
    assert set(delivered) == set(range(total))  # nothing lost
    assert duplicates <= len(in_flight)
    print(f"killed node held {len(in_flight)} deliveries; {duplicates} delivered twice; "
          f"all delivered {taken_over_in:.1f} s after the kill")


def test_nodes_started_together_on_an_older_database_migrate_it_once(
    deployment: Deployment, postgres_db_url: str, tmp_path: Path,
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
    cluster = Cluster(deployment, postgres_db_url, tmp_path)
    try:
        cluster.start()  # all three at the same instant: none may fail
        current = cluster.relays[2].cli("db", "current")
        assert current.returncode == 0, current
        assert current.stdout.splitlines()[0].endswith("(head)"), current
        assert len(cluster.nodes()) == len(HOSTS)
        assert sum(r.count("migration failed") for r in cluster.relays) == 0
    finally:
        for relay in cluster.relays:
            relay.stop_quietly()
