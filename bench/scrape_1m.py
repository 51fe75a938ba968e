"""Benchmark (not a test): what one Prometheus scrape costs with 1,000,000 queued messages.

Fills a SQLite queue (triggers active, so `queue_counts` is kept as in
production) with N messages spread over destinations, states and five days,
then times:

- the scrape-time reads: `Queue.counts()` + `Queue.oldest_received_at()`;
- a full `/metrics` generation (`generate_latest` on a `Metrics` registry),
  and the same over a real HTTP socket through `relay.ops.http`;
- the old way: GROUP BY scans over `messages` (what `Queue.stats()` did);
- the write-side cost of the triggers: `Queue.put_many` with and without them.

    .venv/bin/python bench/scrape_1m.py [--messages 1000000] [--db PATH] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import generate_latest
from sqlalchemy import Engine, func, select

from relay.core.clock import FakeClock
from relay.core.destination import State
from relay.core.values import HostPort
from relay.ops.http import HealthCheck, start_http
from relay.ops.metrics import Metrics
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import NewMessage
from relay.queue.schema import SQLITE_COUNT_TRIGGERS, messages

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DOMAINS = [f"customer{i:02d}.example" for i in range(50)]
WEIGHTS = [1 / (i + 1) for i in range(50)]  # a few big destinations, a long tail


def sqlite_time(when: datetime) -> str:
    """How SQLAlchemy's DateTime stores a (naive UTC) value in SQLite."""
    return when.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def fill(engine: Engine, total: int, seed: int = 1) -> float:
    """Bulk insert `total` messages, one recipient each, triggers active; seconds taken."""
    rnd = random.Random(seed)
    raw: Any = engine.raw_connection()
    started = time.perf_counter()
    try:
        cur = raw.cursor()
        cur.execute("PRAGMA synchronous=OFF")  # a bulk load, not the accept path
        cur.execute("BEGIN")
        cur.execute("INSERT INTO bodies (id, data) VALUES ('B', x'00')")
        chunk = 50_000
        for start in range(0, total, chunk):
            rows = []
            rcpts = []
            for i in range(start, min(total, start + chunk)):
                qid = f"M{i:08d}"
                dest = rnd.choices(DOMAINS, WEIGHTS)[0]
                roll = rnd.random()
                state = "active" if roll < 0.01 else "hold" if roll < 0.10 else "deferred"
                received = sqlite_time(T0 + timedelta(seconds=rnd.uniform(0, 5 * 86400)))
                rows.append(
                    (
                        qid,
                        "B",
                        dest,
                        "s@sender.example",
                        1000,
                        received,
                        "",
                        "",
                        0,
                        0,
                        0,
                        state,
                        received,
                        1,
                        "",
                        None,
                        None,
                        0,
                    )
                )
                rcpts.append((qid, f"user{i}@{dest}", "deferred", 1, ""))
            cur.executemany(
                "INSERT INTO messages (id, body_id, destination, sender, size, received_at, "
                "client_address, client_helo, smtputf8, eightbit, is_dsn, state, "
                "next_attempt_at, attempts, last_error, lease_owner, lease_expires_at, "
                "delay_warned) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            cur.executemany(
                "INSERT INTO recipients (message_id, address, status, attempts, last_reply) "
                "VALUES (?,?,?,?,?)",
                rcpts,
            )
            print(f"  filled {min(total, start + chunk):>9,}", end="\r", flush=True)
        cur.execute("COMMIT")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("ANALYZE")
        cur.close()
    finally:
        raw.close()
    print()
    return time.perf_counter() - started


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(median ms, max ms, last result) over `repeat` runs, after one warm-up."""
    result = fn()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs), max(runs), result


def old_group_by(engine: Engine) -> tuple[dict[str, int], dict[str, int], Any]:
    """What Queue.stats() did before queue_counts: two GROUP BY scans and a min()."""
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn, conn.begin():
        by_state = dict(
            conn.execute(select(messages.c.state, func.count()).group_by(messages.c.state)).all()
        )
        by_domain = dict(
            conn.execute(
                select(messages.c.destination, func.count()).group_by(messages.c.destination)
            ).all()
        )
        oldest = conn.execute(select(func.min(messages.c.received_at))).scalar()
    return by_state, by_domain, oldest


def old_by_state(engine: Engine) -> dict[str, int]:
    """The cheapest scan-based collector: GROUP BY state only."""
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        return dict(
            conn.execute(select(messages.c.state, func.count()).group_by(messages.c.state)).all()
        )


async def http_scrapes(metrics: Metrics, queue: Queue, repeat: int) -> tuple[float, float, int]:
    health = HealthCheck(lambda: True, queue.ping)
    server = await start_http(HostPort("127.0.0.1", 0), metrics.registry, health)
    port = server.sockets[0].getsockname()[1]
    runs = []
    size = 0
    try:
        for _ in range(repeat + 1):
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
            runs.append((time.perf_counter() - started) * 1000)
            assert data.startswith(b"HTTP/1.1 200"), data[:100]
            size = len(data)
    finally:
        server.close()
        await server.wait_closed()
        health.close()
    runs = runs[1:]
    return statistics.median(runs), max(runs), size


def put_cost(directory: Path, with_triggers: bool, messages_n: int, batch: int) -> float:
    """Microseconds per message for Queue.put_many (synchronous=FULL, as in production)."""
    engine = db.connect(f"sqlite:///{directory}/put-{with_triggers}-{batch}.db")
    db.upgrade(engine)
    if not with_triggers:
        with engine.begin() as conn:
            for name in ("insert", "delete", "update"):
                conn.exec_driver_sql(f"DROP TRIGGER trg_messages_count_{name}")
    queue = Queue(engine)
    started = time.perf_counter()
    for start in range(0, messages_n, batch):
        queue.put_many(
            [
                NewMessage(
                    id=f"P{i:07d}",
                    sender="s@sender.example",
                    recipients=(f"u{i}@{DOMAINS[i % 7]}",),
                    data=b"x" * 2000,
                    received_at=T0,
                )
                for i in range(start, start + batch)
            ]
        )
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed / messages_n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, help="SQLite file to create (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    path = args.db or workdir / "queue.db"
    if path.exists():
        sys.exit(f"{path} exists; give a new path")
    engine = db.connect(f"sqlite:///{path}")
    db.upgrade(engine)
    assert len(SQLITE_COUNT_TRIGGERS) == 3
    queue = Queue(engine)

    print(f"SQLite {engine.dialect.dbapi.sqlite_version}, {path}")  # type: ignore[union-attr]
    print(f"filling {args.messages:,} messages (+1 recipient each), triggers active ...")
    seconds = fill(engine, args.messages)
    print(
        f"  fill: {seconds:.1f} s ({args.messages / seconds:,.0f} messages/s), "
        f"file {path.stat().st_size / 1e6:.0f} MB"
    )

    counts = queue.counts()
    truth = old_by_state(engine)
    assert counts == {s: truth.get(s, 0) for s in counts}, (counts, truth)
    assert sum(counts.values()) == args.messages
    print(f"  counts() == GROUP BY: {counts}")

    print("\nper scrape (median / max, ms):")
    clock = FakeClock(T0 + timedelta(days=6))
    metrics = Metrics(queue, clock)
    for name in (f"d{i}" for i in range(20)):
        metrics.destination(name, State.UP)

    def report(label: str, median: float, worst: float) -> None:
        print(f"  {label:<52} {median:9.3f} / {worst:9.3f}")

    med, worst, _ = timed(lambda: (queue.counts(), queue.oldest_received_at()), 200)
    report("new: counts() + oldest_received_at()", med, worst)
    med, worst, _ = timed(queue.counts_by_destination, 200)
    report("new: counts_by_destination()", med, worst)
    med, worst, _ = timed(queue.stats, 50)
    report("new: Queue.stats() (queue stats CLI)", med, worst)
    med, worst, body = timed(lambda: generate_latest(metrics.registry), 100)
    report(f"new: generate_latest() full /metrics ({len(body)} B)", med, worst)
    med, worst, size = asyncio.run(http_scrapes(metrics, queue, 50))
    report(f"new: GET /metrics over HTTP ({size} B)", med, worst)
    med, worst, _ = timed(lambda: old_by_state(engine), 5)
    report("old: GROUP BY state", med, worst)
    med, worst, _ = timed(lambda: old_group_by(engine), 5)
    report("old: Queue.stats() GROUP BY state + domain + min", med, worst)

    print("\nwrite side, Queue.put_many, synchronous=FULL (us per message):")
    for batch in (1, 50):
        n = 300 if batch == 1 else 5000
        without = put_cost(workdir, False, n, batch)
        with_ = put_cost(workdir, True, n, batch)
        print(f"  batch {batch:>3}: without triggers {without:8.1f}   with triggers {with_:8.1f}")

    engine.dispose()
    if args.keep:
        print(f"\nkept {path}")
    else:
        for leftover in sorted(workdir.glob("*")):
            leftover.unlink()
        if args.db:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        workdir.rmdir()


if __name__ == "__main__":
    main()
