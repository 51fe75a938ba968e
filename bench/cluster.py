"""One node vs two on one PostgreSQL queue: accept, drain, CPU per message, lock waits.

    python3 bench/cluster.py [--messages 3000] [--same-port] [--json PATH]

For 1 and then 2 nodes: a fresh database on a private PostgreSQL server
(bench/pgserver.py, fsync on), `relay db upgrade`, that many `relay serve`
on distinct 127.x addresses with distinct `node.hostname`, all with the same
next hop (127.0.0.43, down while accepting). Then:

- accept: `smtp-source` sends --messages 10 KB messages over 10 sessions
  (split evenly over the nodes, one smtp-source per node, run together);
  msg/s from the first connection to the last 250, checked against the
  queue;
- drain: `smtp-sink` answers on the next hop, `relay queue flush --all` on
  one node (the others hear it through NOTIFY); msg/s until the queue is empty;
- CPU µs per message of the relay processes and of the PostgreSQL processes
  (utime+stime from /proc, before and after, the postmaster's exited children
  included; the sampler's own backend excluded);
- write transactions and WAL bytes per message (next-xid and WAL-position
  deltas, read on our own connection);
- with --same-port: the nodes are accept processes of one host, as the
  `mx-relay@.service` template runs them: one address and port, bound with
  `smtp.reuse_port` (SO_REUSEPORT), one smtp-source of 10 sessions whose
  connections the kernel spreads over them;
- lock waits during accept: `pg_stat_activity` (backends waiting, by
  wait_event_type:wait_event) and `pg_locks` (ungranted locks), sampled every
  0.1 s by one connection of our own.

Prints a table. Owns nothing the relay uses; refuses to run without the
PostgreSQL server binaries or smtp-source/smtp-sink (package postfix).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import free_port, relay_cmd, relay_config, stop_process
from compare import listening, log, reexec_in_venv, wait_for
from pgserver import PgServer

NODE_HOSTS = ("127.0.0.41", "127.0.0.42")
SINK_HOST = "127.0.0.43"
DOMAIN = "bench.example"
SIZE = 10_000
SESSIONS = 10
WARMUP = 100
TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.1  # seconds between lock samples


def proc_stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_of(pid: int, children: bool = False) -> float:
    """utime+stime of `pid` in seconds (+ its reaped children's with `children`)."""
    try:
        fields = proc_stat(pid)
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def postgres_cpu(postmaster: int, exclude: int) -> float:
    """The postmaster with its reaped children, and each live child but `exclude`."""
    total = cpu_of(postmaster, children=True)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            fields = proc_stat(int(entry.name))
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


class Node:
    """One `relay serve` on the shared queue."""

    def __init__(self, work: Path, index: int, url: str, sink_port: int,
                 shared: tuple[str, int] | None = None) -> None:
        self.host, self.port = shared or (
            NODE_HOSTS[index], 25 if os.geteuid() == 0 else free_port(NODE_HOSTS[index]))
        self.config = work / f"node{index}.toml"
        self.log = work / f"node{index}.log"
        text = relay_config(f"{self.host}:{self.port}", url, f"[{SINK_HOST}]:{sink_port}")
        text = text.replace('hostname = "bench-relay.example"',
                            f'hostname = "node{index}.bench.example"')
        if shared:
            text = text.replace("[smtp]\n", "[smtp]\nreuse_port = true\n")
        self.config.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("a") as handle:
            self.proc = subprocess.Popen(relay_cmd(self.config, "serve"), stdout=handle,
                                         stderr=handle, start_new_session=True)
        proc = self.proc
        wait_for(f"relay serve on {self.host}", lambda: self.bound() or proc.poll() is not None,
                 120)
        if proc.poll() is not None:
            raise SystemExit(f"relay serve exited:\n{self.log.read_text()[-2000:]}")

    def bound(self) -> bool:
        """This process listens on the port (another one may already: --same-port)."""
        if self.proc is None:
            return False
        found = subprocess.run(["ss", "-Hltnp", f"sport = :{self.port}"], capture_output=True,
                               text=True, check=False).stdout
        return f"pid={self.proc.pid}," in found

    def cpu(self) -> float:
        return 0.0 if self.proc is None else cpu_of(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class LockSampler:
    """Samples waiting backends and ungranted locks on one connection until stopped."""

    def __init__(self, url: str) -> None:
        import psycopg  # the venv's packages

        self.conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                                    autocommit=True)
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        self.backend = int(row[0]) if row else 0
        self.samples = 0
        self.with_wait = 0
        self.max_waiting = 0
        self.max_ungranted = 0
        self.events: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one connection, two threads
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            with self._lock:
                waiting = self.conn.execute(
                    "SELECT wait_event_type || ':' || wait_event FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND state = 'active' AND wait_event_type IN ('Lock', 'LWLock')").fetchall()
                row = self.conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
            ungranted = int(row[0]) if row else 0
            self.samples += 1
            self.with_wait += bool(waiting or ungranted)
            self.max_waiting = max(self.max_waiting, len(waiting))
            self.max_ungranted = max(self.max_ungranted, ungranted)
            self.events.update(str(w[0]) for w in waiting)

    def position(self) -> tuple[int, int]:
        """(next transaction id, WAL position in bytes): their deltas count write
        transactions (commits that wrote) and WAL bytes; no stats-collector delay."""
        with self._lock:
            row = self.conn.execute(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        top = ", ".join(f"{e} {n}" for e, n in self.events.most_common(3)) or "none"
        return (f"{self.with_wait}/{self.samples} samples waiting; max {self.max_waiting} "
                f"backends waiting, max {self.max_ungranted} ungranted pg_locks; {top}")


@dataclass
class Result:
    nodes: int
    accept: float = 0.0
    drain: float = 0.0
    drained: int = 0
    relay_us_accept: float = 0.0
    pg_us_accept: float = 0.0
    relay_us_drain: float = 0.0
    pg_us_drain: float = 0.0
    xacts_accept: float = 0.0  # write transactions per message
    wal_accept: float = 0.0  # WAL bytes per message
    xacts_drain: float = 0.0
    wal_drain: float = 0.0
    locks: str = ""
    lock_counts: dict[str, Any] = field(default_factory=dict)

    @property
    def us_accept(self) -> float:
        return self.relay_us_accept + self.pg_us_accept

    @property
    def us_drain(self) -> float:
        return self.relay_us_drain + self.pg_us_drain


def smtp_source(nodes: list[Node], messages: int) -> float:
    """`messages` over SESSIONS sessions split evenly over `nodes`, all at once: seconds.
    Nodes sharing one port get one generator."""
    procs = []
    started = time.perf_counter()
    if len({(n.host, n.port) for n in nodes}) == 1:
        nodes = nodes[:1]
    for i, node in enumerate(nodes):
        share = messages // len(nodes) + (i < messages % len(nodes))
        procs.append(subprocess.Popen(
            ["smtp-source", "-s", str(SESSIONS // len(nodes)), "-m", str(share),
             "-l", str(SIZE), "-M", "client.sender.example", "-f", "bench@sender.example",
             "-t", f"user@{DOMAIN}", f"{node.host}:{node.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True))
    for proc in procs:
        _out, err = proc.communicate(timeout=120 + messages / 5)
        if proc.returncode != 0:
            raise SystemExit(f"smtp-source failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - started


def run(pg: PgServer, work: Path, count: int, messages: int, same_port: bool) -> Result:
    from relay.queue import db  # the venv's packages: imported once main() re-exec'd
    from relay.queue.access import Queue

    url = pg.create_database()
    sink_port = free_port(SINK_HOST)
    shared = (NODE_HOSTS[0], free_port(NODE_HOSTS[0])) if same_port else None
    nodes = [Node(work, i, url, sink_port, shared) for i in range(count)]
    subprocess.run(relay_cmd(nodes[0].config, "db", "upgrade"), check=True,
                   capture_output=True, timeout=300)
    queue = Queue(db.connect(url))
    postmaster = pg.postmaster_pid()
    assert postmaster is not None
    result = Result(count)
    try:
        for node in nodes:
            node.start()

        def settle(expected: int) -> None:
            def done() -> bool:
                counts = queue.counts()
                return sum(counts.values()) == expected and counts.get("active", 0) == 0
            wait_for(f"{expected} queued, none in flight", done, 300, 0.2)

        smtp_source(nodes, WARMUP)
        settle(WARMUP)
        os.sync()
        with LockSampler(url) as sampler:
            xid0, wal0 = sampler.position()
            relay0 = sum(n.cpu() for n in nodes)
            pg0 = postgres_cpu(postmaster, sampler.backend)
            seconds = smtp_source(nodes, messages)
            settle(WARMUP + messages)  # the deferrals after the failed first attempts too
            relay1 = sum(n.cpu() for n in nodes)
            pg1 = postgres_cpu(postmaster, sampler.backend)
            xid1, wal1 = sampler.position()
        result.xacts_accept = (xid1 - xid0) / messages
        result.wal_accept = (wal1 - wal0) / messages
        result.accept = messages / seconds
        result.relay_us_accept = (relay1 - relay0) / messages * 1e6
        result.pg_us_accept = (pg1 - pg0) / messages * 1e6
        result.locks = sampler.summary()
        result.lock_counts = {"samples": sampler.samples, "with_wait": sampler.with_wait,
                              "max_waiting": sampler.max_waiting,
                              "max_ungranted": sampler.max_ungranted,
                              "events": dict(sampler.events)}
        log(f"{count} node(s): accept {result.accept:.0f} msg/s; {result.locks}")

        total = WARMUP + messages
        os.sync()
        sink_cmd = ["smtp-sink"] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [
            f"{SINK_HOST}:{sink_port}", "1024"]
        sink = subprocess.Popen(sink_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_for("smtp-sink", lambda: listening(SINK_HOST, sink_port), 10)
            xid0, wal0 = sampler.position()
            relay0 = sum(n.cpu() for n in nodes)
            pg0 = postgres_cpu(postmaster, sampler.backend)
            started = time.perf_counter()
            subprocess.run(relay_cmd(nodes[0].config, "queue", "flush", "--all"), check=True,
                           capture_output=True, timeout=120)
            wait_for("queue empty", lambda: sum(queue.counts().values()) == 0,
                     60 + total / 10, 0.1)
            seconds = time.perf_counter() - started
            relay1 = sum(n.cpu() for n in nodes)
            pg1 = postgres_cpu(postmaster, sampler.backend)
            xid1, wal1 = sampler.position()
        finally:
            stop_process(sink, timeout=10)
            sampler.conn.close()
        result.xacts_drain = (xid1 - xid0) / total
        result.wal_drain = (wal1 - wal0) / total
        result.drained = total
        result.drain = total / seconds
        result.relay_us_drain = (relay1 - relay0) / total * 1e6
        result.pg_us_drain = (pg1 - pg0) / total * 1e6
        log(f"{count} node(s): drain {result.drain:.0f} msg/s")
    finally:
        for node in nodes:
            node.stop()
        queue.engine.dispose()
        pg.drop_database(url)
    return result


def table(results: list[Result]) -> str:
    one = results[0]
    rows = [
        ("accept msg/s, 10 sessions", lambda r: f"{r.accept:,.0f}",
         lambda r: r.accept / one.accept),
        ("drain msg/s", lambda r: f"{r.drain:,.0f}", lambda r: r.drain / one.drain),
        ("CPU µs/msg accept, relay + PostgreSQL",
         lambda r: f"{r.us_accept:,.0f} ({r.relay_us_accept:,.0f} + {r.pg_us_accept:,.0f})",
         lambda r: r.us_accept / one.us_accept),
        ("CPU µs/msg drain, relay + PostgreSQL",
         lambda r: f"{r.us_drain:,.0f} ({r.relay_us_drain:,.0f} + {r.pg_us_drain:,.0f})",
         lambda r: r.us_drain / one.us_drain),
        ("write transactions / msg, accept; drain",
         lambda r: f"{r.xacts_accept:.2f}; {r.xacts_drain:.2f}",
         lambda r: r.xacts_accept / one.xacts_accept),
        ("WAL bytes / msg, accept; drain",
         lambda r: f"{r.wal_accept:,.0f}; {r.wal_drain:,.0f}",
         lambda r: r.wal_accept / one.wal_accept),
        ("CPU µs/msg accept + drain", lambda r: f"{r.us_accept + r.us_drain:,.0f}",
         lambda r: (r.us_accept + r.us_drain) / (one.us_accept + one.us_drain)),
    ]
    lines = ["| figure | " + " | ".join(f"{r.nodes} node(s)" for r in results)
             + " | 2 / 1 |", "| --- |" + " --- |" * (len(results) + 1)]
    for label, show, ratio in rows:
        lines.append(f"| {label} | " + " | ".join(show(r) for r in results)
                     + f" | {ratio(results[-1]):.2f}x |")
    lines.append("| lock waits during accept | " + " | ".join(r.locks for r in results)
                 + " | |")
    return "\n".join(lines)


def main() -> None:
    reexec_in_venv()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="accepted per figure (3000)")
    parser.add_argument("--same-port", action="store_true",
                        help="the nodes share one address and port (SO_REUSEPORT)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.messages < SESSIONS:
        raise SystemExit(f"--messages must be at least {SESSIONS}")
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install postfix")
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="relay-cluster-"))
    pg = PgServer()
    results: list[Result] = []
    try:
        pg.start()
        log(f"PostgreSQL {pg.version} on 127.0.0.1:{pg.port}")
        for count in (1, 2):
            results.append(run(pg, work, count, args.messages, args.same_port))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        pg.stop()
        if os.environ.get("BENCH_KEEP") is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n1 vs 2 nodes on one PostgreSQL {pg.version} queue (fsync on): {args.messages:,} "
          f"messages of {SIZE // 1000} KB over {SESSIONS} sessions ("
          f"{'one port, SO_REUSEPORT' if args.same_port else 'split over the nodes'}), "
          f"drain of {results[0].drained:,}; {os.cpu_count()} cores; load average "
          f"{load:.2f} at start, {os.getloadavg()[0]:.2f} at end\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
