"""Nodes sharing one queue: heartbeats renew leases, lapsed leases are taken over.

On SQLite and PostgreSQL: a node that beats keeps its deliveries past the
lease it claimed them with; once it stops, another node's claim takes them
over and the dead node's late record is refused. The registry lists nodes
with their active deliveries; loop avoidance hears of the live ones.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from relay.cluster.nodes import predecessors, this_node
from relay.core.model import MessageState, Outcome, RecipientStatus
from relay.queue.access import Queue
from relay.queue.nodes import Node, NodeView
from relay.queue.rows import Attempt, Claimed, NewMessage, RecipientUpdate, Recorded

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def node(name: str, pid: int = 1) -> Node:
    return Node(f"{name}/{pid}/abc", name, pid, T0, ("127.0.0.9",) if name == "n2" else ())


def beat(queue: Queue, n: Node, seconds: float) -> None:
    queue.heartbeat(n, at(seconds), at(seconds + LEASE))


def put(queue: Queue, *ids: str) -> None:
    queue.put_many([NewMessage(id=qid, sender="s@sender.example", recipients=("a@verrotech.com",),
                               data=b"Subject: x\r\n\r\nbody\r\n", received_at=T0) for qid in ids])


def delivered(c: Claimed, owner: str, when: datetime) -> Attempt:
    return Attempt(
        message_id=c.id, owner=owner, lease_until=c.lease_until, at=when,
        recipients=tuple(RecipientUpdate(r.id, r.address, RecipientStatus.DELIVERED, "250 ok",
                                         Outcome.DELIVERED) for r in c.recipients),
        next_attempt_at=None,
    )


def test_a_beating_node_keeps_its_deliveries_and_a_dead_ones_are_taken_over(
    queue: Queue,
) -> None:
    n1, n2 = node("n1"), node("n2")
    beat(queue, n1, 0)
    beat(queue, n2, 0)
    put(queue, "01")
    [first] = queue.claim_due(n1.id, at(0), limit=10, lease=LEASE)

    # Past the claimed lease, but n1 renewed it with its heartbeat: not n2's.
    beat(queue, n1, LEASE - 1)
    assert queue.claim_due(n2.id, at(LEASE + 5), limit=10, lease=LEASE) == []
    assert queue.recover(n2.id, at(LEASE + 5)) == 0

    # n1 dies: its last beat holds until 2*LEASE - 1, not a second longer.
    assert queue.claim_due(n2.id, at(2 * LEASE - 1), limit=10, lease=LEASE) == []
    [second] = queue.claim_due(n2.id, at(2 * LEASE), limit=10, lease=LEASE)
    assert second.id == "01" and second.taken_over and not first.taken_over

    assert queue.record(delivered(first, n1.id, at(2 * LEASE))) is Recorded.STALE
    assert queue.apply([delivered(second, n2.id, at(2 * LEASE))]) == [Recorded.STORED]
    assert queue.list() == []


def test_a_claim_by_an_owner_that_is_no_node_lapses_with_its_lease(queue: Queue) -> None:
    put(queue, "01", "02")
    claimed = queue.claim_due("operator", at(0), limit=1, lease=LEASE)
    assert [c.id for c in claimed] == ["01"]
    assert [c.id for c in queue.claim_due("n2", at(1), limit=10, lease=LEASE)] == ["02"]
    assert queue.claim_due("n2", at(LEASE - 1), limit=10, lease=LEASE) == []
    [taken] = queue.claim_due("n2", at(LEASE + 1), limit=10, lease=LEASE)
    assert taken.id == "01" and taken.taken_over


def test_a_clean_stop_lets_others_take_over_at_once(queue: Queue) -> None:
    n1 = node("n1")
    beat(queue, n1, 0)
    put(queue, "01")
    queue.claim_due(n1.id, at(0), limit=1, lease=LEASE)
    queue.node_stopped(n1.id, at(LEASE + 1))
    assert [c.id for c in queue.claim_due("n2", at(LEASE + 2), limit=1, lease=LEASE)] == ["01"]


def test_registry_lists_nodes_with_their_deliveries_and_counts_the_live_ones(
    queue: Queue,
) -> None:
    n1, n2, old = node("n1"), node("n2"), node("old")
    beat(queue, old, -3600)
    beat(queue, n1, 0)
    beat(queue, n2, 0)
    put(queue, "01", "02", "03")
    queue.claim_due(n1.id, at(0), limit=2, lease=LEASE)

    seen = {n.id: n for n in queue.nodes(at(-60))}
    assert set(seen) == {n1.id, n2.id}
    assert (seen[n1.id].active_deliveries, seen[n2.id].active_deliveries) == (2, 0)
    assert seen[n2.id].addresses == ("127.0.0.9",) and seen[n1.id].pid == 1
    assert queue.nodes_up(at(1)) == 2
    assert queue.nodes_up(at(LEASE + 1)) == 0
    assert queue.peers(at(1), (n1.id,)) == ({"n2"}, {"127.0.0.9"})

    listed = {v.id: v.node for v in queue.list()}
    assert listed == {"01": n1.id, "02": n1.id, "03": None}

    queue.heartbeat(n1, at(7200), at(7200 + LEASE), forget_before=at(1))
    assert {n.id for n in queue.nodes(at(-7200))} == {n1.id}  # the old rows were pruned


def view(id_: str, hostname: str, pid: int, alive_until: datetime) -> NodeView:
    return NodeView(id_, hostname, pid, T0, T0, alive_until, (), 0)


def test_predecessors_are_earlier_runs_of_this_host_that_are_gone() -> None:
    me = this_node("mx2.example", (), T0)
    assert me.id.startswith(f"mx2.example/{os.getpid()}/") and me.pid == os.getpid()
    seen = [
        view(me.id, "mx2.example", me.pid, at(60)),  # this run
        view("mx2.example/1/a", "mx2.example", 1, at(-1)),  # heartbeat stopped
        view(f"mx2.example/{os.getpid()}/b", "mx2.example", os.getpid(), at(60)),  # pid reused
        view("mx2.example/2147483646/c", "mx2.example", 2147483646, at(60)),  # process gone
        view(f"mx2.example/{os.getppid()}/d", "mx2.example", os.getppid(), at(60)),  # running
        view("mx3.example/1/e", "mx3.example", 1, at(-1)),  # another node
    ]
    assert predecessors(me, seen, T0) == [
        "mx2.example", "mx2.example/1/a", f"mx2.example/{os.getpid()}/b",
        "mx2.example/2147483646/c",
    ]


def test_state_of_taken_over_message_is_active_for_its_new_owner(queue: Queue) -> None:
    put(queue, "01")
    queue.claim_due("gone", at(0), limit=1, lease=LEASE)
    queue.claim_due("n2", at(LEASE + 1), limit=1, lease=LEASE)
    [v] = queue.list()
    assert (v.state, v.node) == (MessageState.ACTIVE.value, "n2")


def test_one_probe_per_backoff_step_for_all_nodes(queue: Queue) -> None:
    """Eight nodes (engines of their own) start probes at the same instant: the
    down destination's probe is started once, one parked message made due."""
    import threading

    from sqlalchemy import insert, select, update

    from relay.queue import db
    from relay.queue.schema import destinations, messages

    put(queue, "01", "02", "03")
    with queue.engine.begin() as conn:
        conn.execute(insert(destinations).values(
            name="verrotech.com", up=False, failures=1, retry_at=at(0), last_error="down",
            updated_at=at(-60)))
        conn.execute(update(messages).values(next_attempt_at=None))
    url = queue.engine.url.render_as_string(hide_password=False)
    nodes = [Queue(db.connect(url)) for _ in range(8)]
    start = threading.Barrier(len(nodes))
    started: list[list[str]] = [[] for _ in nodes]

    def probe(i: int) -> None:
        start.wait()
        started[i] = nodes[i].start_probes(at(1), at(-3600))

    threads = [threading.Thread(target=probe, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for other in nodes:
        other.engine.dispose()
    assert sorted(name for names in started for name in names) == ["verrotech.com"]
    with queue.engine.connect() as conn:
        due = conn.execute(select(messages.c.id).where(messages.c.next_attempt_at.is_not(None)))
        assert len(due.all()) == 1
    [probe_claim] = queue.claim_due("n1", at(1), limit=10, lease=LEASE)
    assert probe_claim.probe


def test_relay_nodes_up_is_read_from_the_database_at_each_scrape(queue: Queue) -> None:
    from prometheus_client import generate_latest

    from relay.core.clock import FakeClock
    from relay.ops.metrics import Metrics

    clock = FakeClock(at(1))
    metrics = Metrics(queue, clock, nodes=queue)
    beat(queue, node("n1"), 0)
    beat(queue, node("n2"), 0)
    assert b"relay_nodes_up 2.0" in generate_latest(metrics.registry)
    clock.set(at(LEASE + 1))  # neither beat again within the lease
    assert b"relay_nodes_up 0.0" in generate_latest(metrics.registry)
