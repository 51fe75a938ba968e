"""mx-relay side by side with Postfix as a backup MX: one command, one table.

    python3 bench/compare.py [--messages 5000] [--runs 3] [--drain 20000]
                             [--skip-postfix] [--quick] [--queue sqlite|postgresql]
                             [--json PATH]

Installs Postfix if needed (bench/postfix.py: debconf "No configuration", then
a private instance in a temporary directory), starts both servers as the
backup MX of one domain whose primary is down (nothing listens on the next
hop), and measures with the same load generator for both, Postfix's
`smtp-source` (10 KB messages, one per connection):

- accept msg/s with 10 parallel sessions and with 1 session, and the
  DATA-end -> 250 latency of 1 session (a small asyncio client, up to
  5,000 messages per run, so that p99 is not one slow fsync's draw);
- drain: --drain messages queued while the primary is down, then
  `smtp-sink` answers on the next hop and the operator flushes
  (`relay queue flush --all` / `postqueue -f`): msg/s until the queue is empty;
- mx-relay only: accept msg/s with --prefill messages already queued (filled
  through `Queue.put_many` into a second relay), in turns with a relay whose
  queue is empty;
- mx-relay only: VmRSS/VmHWM of `relay serve` with --rss-queue small messages
  queued, after its first scheduler passes.

With --verify-spf only one comparison is made, mx-relay against itself:
accept msg/s over 10 sessions with `verify = "learned"` (the recipient
imported beforehand, so RCPT is answered from memory) and SPF on (a loopback
DNS server this script starts, tests/support/dns_server.py, publishing the
sender's SPF record; the warm-up fills the DNS cache), in turns with a relay
with both off; the ratio is on / off.

With --queue postgresql mx-relay's queue is a fresh database (`relay db
upgrade` before each start) on a private PostgreSQL server the script starts
(bench/pgserver.py: initdb in a temp dir, 127.0.0.1 and a free port only,
fsync and synchronous_commit on) and removes at the end; its processes' CPU
counts as ours, not as other load.

Both queues are durable (Postfix fsyncs every queue file before its 250,
mx-relay commits with SQLite synchronous=FULL). Each run starts from empty
queues, warms both servers up, and measures them one after the other
(alternating who goes first); every figure is the median over --runs. The
machine's CPU not used by this script or the servers it started is measured
too: a measurement during which other processes used more than --max-other
cores is taken again (twice at most), and the worst is reported.

Needs root for Postfix and port 25 (on 127.0.0.20, .22 and .23 only; the
primary/smtp-sink is 127.0.0.21); with --skip-postfix the relay runs on free
ports. BENCH_KEEP=1 keeps the temporary directory (configs, logs, queues).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import postfix  # bench/postfix.py
from common import body, free_port, relay_cmd, relay_config, stop_process
from pgserver import PgServer

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"

POSTFIX_HOST = "127.0.0.20"  # Postfix smtpd
PRIMARY_HOST = "127.0.0.21"  # the primary MX: down, later smtp-sink
RELAY_HOST = "127.0.0.22"  # mx-relay smtpd
FULL_HOST = "127.0.0.23"  # mx-relay smtpd, the instance with a prefilled queue
DOMAIN = "bench.example"
SENDER = "bench@sender.example"
RECIPIENT = f"user@{DOMAIN}"
SIZE = 10_000
SESSIONS = 10
WARMUP = 100  # messages over 10 sessions after every reset, not measured
LATENCY_MAX = 5000  # latency probe: at most this many per run (p99 is then the 50th slowest)
FULL = {"messages": 5000, "runs": 3, "drain": 20_000, "prefill": 100_000, "rss_queue": 1_000_000}
QUICK = {"messages": 300, "runs": 1, "drain": 1000, "prefill": 10_000, "rss_queue": 100_000}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def reexec_in_venv() -> None:
    """`python3 bench/compare.py` works too: the relay and its imports need the venv."""
    python = VENV / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(python, [str(python), *sys.argv])


def wait_for(what: str, ready: Callable[[], bool], timeout: float,
              interval: float = 0.05) -> float:
    """Poll `ready` until true; seconds taken. SystemExit after `timeout`."""
    started = time.perf_counter()
    while not ready():
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)  # a benchmark harness polling a process it started
    return time.perf_counter() - started


def listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# ------------------------------------------------- other load on the machine

TICKS = os.sysconf("SC_CLK_TCK")
OUR_SESSIONS: set[int] = set()  # sessions of the servers and sinks this script started
OUR_PARENTS: set[int] = set()  # the postmaster: each of its children setsid()s


def machine_busy() -> float:
    """CPU seconds the machine spent busy (all cores, incl. steal) since boot."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICKS


def our_cpu() -> float:
    """CPU seconds of this script, its reaped children and every session it started.

    A session's processes are its leader's descendants (Postfix's master and
    its daemons; `relay serve`); what an exited daemon used is in its parent's
    cutime/cstime, so the sum over live processes never goes down.
    """
    times = os.times()
    total = (times.user + times.system + times.children_user
             + times.children_system) * TICKS
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[3]) in OUR_SESSIONS or int(fields[1]) in OUR_PARENTS:
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / TICKS


@dataclass(frozen=True)
class Meter:
    """A point in time: wall clock, machine CPU, our CPU."""

    wall: float
    busy: float
    ours: float

    @classmethod
    def now(cls) -> Meter:
        return cls(time.perf_counter(), machine_busy(), our_cpu())

    def other_since(self, start: Meter) -> float:
        """Cores busy with work that is not ours (other benchmarks, builds), on average.

        About 0.1 on an otherwise idle machine: kernel threads (journal, loopback).
        """
        return max(0.0, ((self.busy - start.busy) - (self.ours - start.ours))
                   / max(self.wall - start.wall, 1e-6))


# --------------------------------------------------------------- load tools


def smtp_source(host: str, port: int, messages: int, sessions: int,
                timeout: float) -> tuple[float, float]:
    """Postfix's smtp-source: `messages` of SIZE bytes, one per connection.

    Returns msg/s and the cores other processes used meanwhile.
    """
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(SIZE),
           "-M", "client.sender.example", "-f", SENDER, "-t", RECIPIENT, f"{host}:{port}"]
    start = Meter.now()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            start_new_session=True)
    end = Meter.now()
    if result.returncode != 0:
        raise SystemExit(f"smtp-source against {host}:{port} failed: "
                         f"{result.stderr.strip()[-500:]}")
    return messages / (end.wall - start.wall), end.other_since(start)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def _send_timed(host: str, port: int, data: bytes) -> float:
    """One message on its own connection; seconds from the final '.' to the 250.

    bench/throughput.py's send_one does the same against HOST only; this one
    takes the host (Postfix and mx-relay listen on different addresses).
    """
    async with asyncio.timeout(60):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await _reply(reader)
            for command in (b"EHLO client.sender.example\r\n",
                            f"MAIL FROM:<{SENDER}>\r\n".encode(),
                            f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"DATA\r\n"):
                writer.write(command)
                answer = await _reply(reader)
                if answer[:1] not in (b"2", b"3"):
                    raise SystemExit(f"{host}:{port}: {command!r} -> {answer!r}")
            writer.write(data + b".\r\n")
            started = time.perf_counter()
            answer = await _reply(reader)
            latency = time.perf_counter() - started
            if not answer.startswith(b"250"):
                raise SystemExit(f"{host}:{port}: end of DATA -> {answer!r}")
            writer.write(b"QUIT\r\n")
            await _reply(reader)
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()
    return latency


def latency_probe(host: str, port: int, messages: int) -> tuple[float, float, float]:
    """1 session, one message per connection: p50 and p99 of DATA-end -> 250 in ms,
    and the cores other processes used meanwhile."""
    payloads = [body(n, SIZE) for n in range(messages)]

    async def run() -> list[float]:
        return [await _send_timed(host, port, p) for p in payloads]

    start = Meter.now()
    latencies = sorted(asyncio.run(run()))
    other = Meter.now().other_since(start)
    return percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000, other


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    rank = max(1, -(-len(values) * pct // 100))  # ceil
    return values[int(rank) - 1]


class Sink:
    """Postfix's smtp-sink on the next hop: the primary is back."""

    def __init__(self, port: int) -> None:
        cmd = ["smtp-sink"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # required when started as root
        cmd += [f"{PRIMARY_HOST}:{port}", "1024"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        OUR_SESSIONS.add(self.proc.pid)
        wait_for("smtp-sink", lambda: listening(PRIMARY_HOST, port) or
                 self.proc.poll() is not None, 10)
        if self.proc.poll() is not None:
            raise SystemExit(f"smtp-sink did not start: {self.proc.stderr.read()!r}"
                             if self.proc.stderr else "smtp-sink did not start")

    def cpu(self) -> float:
        """Seconds of CPU smtp-sink used so far (utime + stime)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        OUR_SESSIONS.discard(self.proc.pid)


# ------------------------------------------------------------------ servers


class Server(Protocol):
    name: str
    host: str
    port: int

    def reset(self) -> None:
        """Running, with an empty queue."""

    def queued(self) -> int: ...

    def settle(self) -> None:
        """Wait until what was just accepted has settled (deferred, not in flight)."""

    def flush_command(self) -> list[str]: ...

    @property
    def sink_port(self) -> int: ...


class Relay:
    """`relay serve` as a subprocess; its queue is SQLite in `work`, or a database of
    its own on `pg` (a fresh one after every wipe)."""

    name = "mx-relay"

    def __init__(self, work: Path, host: str, port: int, sink_port: int, trash: Path,
                 pg: PgServer | None = None, spf_dns: str = "", verify: str = "off") -> None:
        self.work, self.trash, self.pg = work, trash, pg
        self.spf_dns, self.verify = spf_dns, verify
        self.host, self.port, self._sink_port = host, port, sink_port
        self.db = work / "queue.db"
        self.config = work / "relay.toml"
        self.log = work / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._queue: Any = None  # relay.queue.access.Queue, opened on first use
        work.mkdir(parents=True, exist_ok=True)
        self._new_queue()

    def _new_queue(self) -> None:
        """Point the config at an empty queue: a new PostgreSQL database, or queue.db."""
        self.url = f"sqlite:///{self.db}" if self.pg is None else self.pg.create_database()
        self.config.write_text(relay_config(f"{self.host}:{self.port}", self.url,
                                            f"[{PRIMARY_HOST}]:{self._sink_port}",
                                            spf_dns=self.spf_dns, verify=self.verify))

    @property
    def sink_port(self) -> int:
        return self._sink_port

    def start(self, timeout: float = 120) -> float:
        """Start `relay serve`; seconds until it accepts connections."""
        subprocess.run(relay_cmd(self.config, "db", "upgrade"), check=True,
                       capture_output=True, timeout=300)
        if self.verify == "learned":  # known before the first RCPT: answered from memory
            known = self.work / "recipients.txt"
            known.write_text(f"{RECIPIENT}\n")
            subprocess.run(relay_cmd(self.config, "recipients", "import", str(known),
                                     "--domain", DOMAIN), check=True, capture_output=True,
                           timeout=300)
        with self.log.open("a") as handle:
            self.proc = subprocess.Popen(relay_cmd(self.config, "serve"), stderr=handle,
                                         stdout=handle, start_new_session=True)
        proc = self.proc
        OUR_SESSIONS.add(proc.pid)
        seconds = wait_for("relay serve", lambda: listening(self.host, self.port) or
                           proc.poll() is not None, timeout)
        if proc.poll() is not None:
            raise SystemExit(f"relay serve exited:\n{self.log_tail()}")
        return seconds

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc)
        OUR_SESSIONS.discard(self.proc.pid)
        self.proc = None

    def wipe(self) -> None:
        """No queue database; the old one goes to trash (see PostfixInstance.renew())."""
        if self._queue is not None:
            self._queue.engine.dispose()
            self._queue = None
        if self.pg is not None:
            self.pg.drop_database(self.url)
            self._new_queue()
            return
        self.trash.mkdir(parents=True, exist_ok=True)
        stamp = time.monotonic_ns()
        for path in self.work.glob("queue.db*"):
            path.rename(self.trash / f"{self.work.name}-{stamp}-{path.name}")

    def reset(self) -> None:
        self.stop()
        self.wipe()
        self.start()

    def counts(self) -> dict[str, int]:
        """Messages per state through the queue API (what `relay queue stats` shows)."""
        if self._queue is None:
            from relay.queue import db  # the venv's packages: imported once main() re-exec'd
            from relay.queue.access import Queue

            self._queue = Queue(db.connect(self.url))
        counts: dict[str, int] = self._queue.counts()
        return counts

    def queued(self) -> int:
        return sum(self.counts().values())

    def settle(self) -> None:
        wait_for("mx-relay: no delivery attempt running",
                 lambda: self.counts().get("active", 0) == 0, 300, 0.2)

    def flush_command(self) -> list[str]:
        return relay_cmd(self.config, "queue", "flush", "--all")

    def rss(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in kB."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        fields = {line.split(":")[0]: int(line.split()[1]) for line in status
                  if line.startswith(("VmRSS:", "VmHWM:"))}
        return fields["VmRSS"], fields["VmHWM"]

    def cpu(self) -> float:
        """CPU seconds `relay serve` has used (all its threads)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:13]) / TICKS  # utime stime

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class Postfix:
    name = "Postfix"

    def __init__(self, work: Path, sink_port: int, trash: Path) -> None:
        self.host, self.port, self._sink_port = POSTFIX_HOST, 25, sink_port
        self.trash = trash
        self._session: int | None = None  # master(8)'s session: its daemons' CPU is ours
        self.instance = postfix.PostfixInstance(work, POSTFIX_HOST, f"[{PRIMARY_HOST}]:{sink_port}",
                                                DOMAIN)

    @property
    def sink_port(self) -> int:
        return self._sink_port

    def start(self) -> None:
        self.instance.start()
        wait_for("postfix smtpd", lambda: listening(self.host, self.port), 60)
        pid = self.instance.master_pid()
        self._session = os.getsid(pid) if pid is not None else None
        if self._session is not None:
            OUR_SESSIONS.add(self._session)

    def stop(self) -> None:
        self.instance.stop()
        if self._session is not None:
            OUR_SESSIONS.discard(self._session)

    def reset(self) -> None:
        """A new, empty queue directory; the old one goes to trash (see renew())."""
        self.stop()
        self.instance.renew(self.trash)
        self.start()

    def queued(self) -> int:
        return self.instance.queued()

    def settle(self) -> None:
        wait_for("postfix: incoming and active queues empty",
                 lambda: self.instance.in_flight() == 0, 300, 0.2)

    def flush_command(self) -> list[str]:
        return self.instance.flush_command()


# ------------------------------------------------------------------ figures


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    relay: list[float] = field(default_factory=list)
    postfix: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)  # cores others used, per measurement
    baseline: Figure | None = None  # ratio against this mx-relay figure, not Postfix
    baseline_word: str = "empty"  # what the baseline is, in the table's ratio column
    note: str = ""

    noisy: set[str] = field(default_factory=set)  # servers with a run above max_other

    def add(self, server: Server, value: float, other: float = 0.0,
            limit: float = float("inf")) -> None:
        (self.relay if server.name == "mx-relay" else self.postfix).append(value)
        self.other.append(other)
        if other > limit:
            self.noisy.add(server.name)

    @staticmethod
    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        mine = self.median(self.relay)
        other = self.median(self.baseline.relay if self.baseline else self.postfix)
        if mine is None or not other:
            return None
        return mine / other

    def as_json(self) -> dict[str, Any]:
        return {"figure": self.label, "unit": self.unit,
                "mx_relay": self.median(self.relay), "postfix": self.median(self.postfix),
                "ratio": self.ratio(),
                "ratio_against": "Postfix" if not self.baseline else
                "mx-relay, empty queue, measured alongside" if self.baseline_word == "empty"
                else f"mx-relay, {self.baseline_word}, measured alongside",
                "mx_relay_runs": self.relay, "postfix_runs": self.postfix,
                "max_other_load_cores": round(max(self.other, default=0.0), 2),
                "servers_with_a_noisy_run": sorted(self.noisy),
                "note": self.note}


def cell(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    digits = 1 if unit == "ms" else 0
    text = f"{statistics.median(values):,.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    return text


def table(figures: list[Figure]) -> str:
    lines = ["| figure | mx-relay | Postfix | mx-relay / Postfix |",
             "| --- | --- | --- | --- |"]
    for f in figures:
        if not f.relay and not f.postfix:
            continue
        ratio = f.ratio()
        ratio_text = "-" if ratio is None else f"{ratio:.2f}"
        if f.baseline and ratio is not None:
            ratio_text += (f" (vs {cell(f.baseline.relay, f.unit).split()[0]} "
                           f"{f.baseline_word}, alongside)")
        relay = (f.note or cell(f.relay, f.unit)) + ("*" if "mx-relay" in f.noisy else "")
        postfix = cell(f.postfix, f.unit) + ("*" if "Postfix" in f.noisy else "")
        lines.append(f"| {f.label} ({f.unit}) | {relay} | {postfix} | {ratio_text} |")
    return "\n".join(lines)


# -------------------------------------------------------------------- phases


@dataclass
class Params:
    messages: int
    runs: int
    drain: int
    prefill: int
    rss_queue: int
    skip_postfix: bool
    max_other: float
    latency_messages: int = 0

    def __post_init__(self) -> None:
        self.latency_messages = min(self.messages, LATENCY_MAX)


T = TypeVar("T")


def clean(what: str, p: Params, measure: Callable[[], tuple[T, float]],
          tries: int = 3) -> tuple[T, float]:
    """Measure; again (`tries` in all) while other processes used > max_other cores."""
    for attempt in range(tries):
        value, other = measure()
        if other <= p.max_other or attempt == tries - 1:
            return value, other
        log(f"{what}: other processes used {other:.2f} cores meanwhile; measuring again")
    raise AssertionError("unreachable")


def accept_timeout(messages: int) -> float:
    return 120 + messages / 5  # even 5 msg/s finishes; a hung server does not hang us


def accepted(server: Server, before: int, messages: int) -> None:
    server.settle()
    got = server.queued() - before
    if got != messages:
        raise SystemExit(f"{server.name}: {got} messages queued, expected {messages}")


def quiesce() -> None:
    """Write back what the previous step left dirty, so its I/O does not slow this one."""
    os.sync()


def measure_accept(server: Server, messages: int, sessions: int) -> tuple[float, float]:
    """smtp-source into `server`, checked against its queue: msg/s, others' cores."""
    quiesce()
    before = server.queued()
    rate, other = smtp_source(server.host, server.port, messages, sessions,
                              accept_timeout(messages))
    accepted(server, before, messages)
    return rate, other


def warm_up(server: Server) -> None:
    measure_accept(server, WARMUP, SESSIONS)


def measure_latency(server: Server, messages: int) -> tuple[tuple[float, float], float]:
    quiesce()
    before = server.queued()
    p50, p99, other = latency_probe(server.host, server.port, messages)
    accepted(server, before, messages)
    return (p50, p99), other


def load_note(other: float) -> str:
    return f" (others used {other:.2f} cores)" if other > 0.2 else ""


def run_accept(servers: list[Server], p: Params, figures: dict[str, Figure]) -> None:
    for run in range(p.runs):
        order = servers if run % 2 == 0 else servers[::-1]
        for server in order:
            server.reset()
            warm_up(server)
        for sessions, key in ((SESSIONS, "accept10"), (1, "accept1")):
            for server in order:
                what = f"run {run + 1}: {server.name} accept, {sessions} session(s)"
                rate, other = clean(what, p, partial(measure_accept, server, p.messages,
                                                     sessions))
                figures[key].add(server, rate, other, p.max_other)
                log(f"{what}: {rate:.0f} msg/s{load_note(other)}")
        for server in order:
            what = f"run {run + 1}: {server.name} DATA-end -> 250, 1 session"
            (p50, p99), other = clean(what, p, partial(measure_latency, server,
                                                       p.latency_messages))
            figures["p50"].add(server, p50, other, p.max_other)
            figures["p99"].add(server, p99, other, p.max_other)
            log(f"{what}: p50 {p50:.1f} ms, p99 {p99:.1f} ms{load_note(other)}")


def run_prefilled(relay: Relay, full: Relay, p: Params, figures: dict[str, Figure]) -> None:
    """`full` has p.prefill messages queued, `relay` an empty queue; measured in turns."""
    from outage import fill  # imports relay: only inside the venv

    full.wipe()
    subprocess.run(relay_cmd(full.config, "db", "upgrade"), check=True, capture_output=True,
                   timeout=300)
    log(f"mx-relay: filling {p.prefill:,} messages of {SIZE} B through put_many")
    seconds = fill(full.url, p.prefill, SIZE)
    log(f"mx-relay: filled in {seconds:.0f} s; starting")
    full.start(timeout=600)
    warm_up(full)  # also: the first pass found the primary down and parked the backlog
    for run in range(p.runs):
        relay.reset()
        warm_up(relay)
        order = [(relay, "empty"), (full, "prefilled")]
        for server, key in order if run % 2 == 0 else order[::-1]:
            queued = "an empty queue" if key == "empty" else f"{p.prefill:,} queued"
            what = f"run {run + 1}: mx-relay accept, {SESSIONS} sessions, {queued}"
            rate, other = clean(what, p, partial(measure_accept, server, p.messages, SESSIONS))
            figures[key].add(server, rate, other, p.max_other)
            log(f"{what}: {rate:.0f} msg/s{load_note(other)}")
    full.stop()
    full.wipe()


def measure_accept_cpu(server: Relay, messages: int) -> tuple[tuple[float, float], float]:
    """`measure_accept` over 10 sessions, plus the relay's CPU ms a message: a
    figure other load on the machine changes far less than msg/s."""
    cpu = server.cpu()
    rate, other = measure_accept(server, messages, SESSIONS)
    return (rate, (server.cpu() - cpu) * 1000 / messages), other


def run_verify_spf(plain: Relay, checked: Relay, p: Params, figures: dict[str, Figure]) -> None:
    """`checked` has verify = "learned" and SPF on, `plain` neither; measured in turns,
    each after a warm-up (which also fills `checked`'s DNS cache)."""
    for run in range(p.runs):
        order = [(plain, "checks_off"), (checked, "checks_on")]
        for server, _ in order:
            server.reset()
            warm_up(server)
        for server, key in order if run % 2 == 0 else order[::-1]:
            what = f"run {run + 1}: mx-relay accept, {SESSIONS} sessions, {key.replace('_', ' ')}"
            (rate, per_message), other = clean(what, p, partial(measure_accept_cpu, server,
                                                                  p.messages))
            figures[key].add(server, rate, other, p.max_other)
            figures[f"{key}_cpu"].add(server, per_message)
            log(f"{what}: {rate:.0f} msg/s, {per_message:.2f} ms CPU a message"
                f"{load_note(other)}")


def spf_zone() -> Any:
    """A loopback DNS server publishing the sender's SPF record (the client is 127.x)."""
    from tests.support.dns_server import DnsServer  # imports dnspython: only inside the venv

    server = DnsServer()
    server.add(SENDER.split("@")[1], "TXT", '"v=spf1 ip4:127.0.0.0/8 -all"', ttl=3600)
    return server.start()


def is_empty(server: Server) -> bool:
    return server.queued() == 0


@contextmanager
def sink(port: int) -> Iterator[Sink]:
    s = Sink(port)
    try:
        yield s
    finally:
        s.stop()


def measure_drain(server: Server, p: Params) -> tuple[float, float]:
    """Queue p.drain with the primary down, then sink + flush: msg/s, others' cores."""
    server.reset()
    log(f"{server.name}: queueing {p.drain:,} messages, primary down")
    measure_accept(server, p.drain, SESSIONS)
    quiesce()
    with sink(server.sink_port) as next_hop:
        start = Meter.now()
        sink0 = next_hop.cpu()
        subprocess.run(server.flush_command(), check=True, capture_output=True, timeout=120)
        wait_for(f"{server.name}: queue empty after flush", partial(is_empty, server),
                 60 + p.drain / 10)
        end = Meter.now()
        busy = (next_hop.cpu() - sink0) / (end.wall - start.wall)
    log(f"{server.name}: smtp-sink busy {busy:.0%} of a core during the drain")
    return p.drain / (end.wall - start.wall), end.other_since(start)


def run_drain(servers: list[Server], p: Params, figure: Figure) -> None:
    for run in range(p.runs):
        order = servers if run % 2 == 0 else servers[::-1]
        for server in order:
            what = f"run {run + 1}: {server.name} drain of {p.drain:,}"
            rate, other = clean(what, p, partial(measure_drain, server, p), tries=2)
            figure.add(server, rate, other, p.max_other)
            log(f"{what}: {rate:.0f} msg/s{load_note(other)}")


def run_rss(relay: Relay, p: Params, figure: Figure) -> None:
    from outage import fill

    relay.stop()
    relay.wipe()
    subprocess.run(relay_cmd(relay.config, "db", "upgrade"), check=True, capture_output=True,
                   timeout=300)
    log(f"mx-relay: filling {p.rss_queue:,} small messages through put_many")
    seconds = fill(relay.url, p.rss_queue, 500)
    log(f"mx-relay: filled in {seconds:.0f} s; starting")
    started = relay.start(timeout=900)
    # the first passes: claim a batch, find the primary down, park the rest; then ticks
    relay.settle()
    time.sleep(10)  # 20 scheduler ticks of 0.5 s after that
    rss, hwm = relay.rss()
    figure.add(relay, rss / 1024)
    figure.note = f"VmRSS {rss / 1024:.0f}, VmHWM {hwm / 1024:.0f}"
    log(f"mx-relay with {p.rss_queue:,} queued: ready in {started:.1f} s, "
        f"VmRSS {rss / 1024:.0f} MB, VmHWM {hwm / 1024:.0f} MB")
    relay.stop()
    relay.wipe()


def environment() -> dict[str, str]:
    env = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
           "cores": str(os.cpu_count()), "kernel": platform.release()}
    if shutil.which("postconf"):
        out = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True, check=False)
        env["postfix"] = out.stdout.strip()
    return env


def main() -> None:
    reexec_in_venv()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, help="per accept figure (5000)")
    parser.add_argument("--runs", type=int, help="figures are medians over runs (3)")
    parser.add_argument("--drain", type=int, help="backlog to drain (20,000)")
    parser.add_argument("--prefill", type=int,
                        help="mx-relay: queued for the already-queued figure (100,000; 0: skip)")
    parser.add_argument("--rss-queue", type=int,
                        help="mx-relay: messages queued for the RSS figure (1,000,000; 0: skip)")
    parser.add_argument("--skip-postfix", action="store_true", help="mx-relay figures only")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 300 messages, 1 run, drain 1000, prefill 10,000, "
                             "RSS with 100,000")
    parser.add_argument("--max-other", type=float, default=0.3,
                        help="measure again (twice at most) when other processes used more "
                             "than this many cores meanwhile (idle machine: about 0.1)")
    parser.add_argument("--queue", choices=("sqlite", "postgresql"), default="sqlite",
                        help="mx-relay's queue: SQLite (default) or a database on a private "
                             "PostgreSQL server this script starts (fsync on)")
    parser.add_argument("--verify-spf", action="store_true",
                        help="only: mx-relay accept with verify = \"learned\" and SPF on "
                             "(warm DNS cache) against both off, in turns")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    defaults = QUICK if args.quick else FULL  # what the command line leaves out
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    p = Params(args.messages, args.runs, args.drain, args.prefill, args.rss_queue,
               args.skip_postfix or args.verify_spf, args.max_other)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignored
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    root = os.geteuid() == 0
    if not p.skip_postfix:
        if not root:
            raise SystemExit("Postfix needs root (postfix start, port 25); "
                             "or run with --skip-postfix")
        postfix.ensure_installed()
    elif not shutil.which("smtp-source"):
        if not root:
            raise SystemExit("smtp-source (package postfix) is missing; install it as root")
        postfix.ensure_installed()

    relay_port = 25 if root else free_port(RELAY_HOST)
    full_port = 25 if root else free_port(FULL_HOST)

    figures = {
        "accept10": Figure("accept10", f"accept, {SESSIONS} sessions, durable, primary down",
                           "msg/s"),
        "accept1": Figure("accept1", "accept, 1 session", "msg/s"),
        "p50": Figure("p50", "DATA-end -> 250 latency p50, 1 session", "ms"),
        "p99": Figure("p99", "DATA-end -> 250 latency p99, 1 session", "ms"),
    }
    figures["empty"] = Figure(
        "empty", f"accept, {SESSIONS} sessions, empty queue, measured alongside the next",
        "msg/s")
    figures["prefilled"] = Figure(
        "prefilled", f"accept, {SESSIONS} sessions, {p.prefill:,} already queued", "msg/s",
        baseline=figures["empty"])
    figures["drain"] = Figure("drain", f"drain of a {p.drain:,} backlog into smtp-sink",
                              "msg/s")
    figures["rss"] = Figure("rss", f"relay RSS with {p.rss_queue:,} queued", "MB")
    figures["checks_off"] = Figure(
        "checks_off", f"accept, {SESSIONS} sessions, verify off, SPF off", "msg/s")
    figures["checks_on"] = Figure(
        "checks_on", f"accept, {SESSIONS} sessions, verify learned, SPF on (warm cache)",
        "msg/s", baseline=figures["checks_off"], baseline_word="both off")
    figures["checks_off_cpu"] = Figure(
        "checks_off_cpu", "relay CPU a message accepted, verify off, SPF off", "ms")
    figures["checks_on_cpu"] = Figure(
        "checks_on_cpu", "relay CPU a message accepted, verify learned, SPF on", "ms",
        baseline=figures["checks_off_cpu"], baseline_word="both off")

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="relay-compare-"))
    work.chmod(0o755)  # Postfix's daemons walk into work/postfix as user postfix
    trash = work / "trash"  # what resets move aside: deleted at the end only
    restart_default = False
    relay: Relay | None = None
    full: Relay | None = None
    pf: Postfix | None = None
    pg: PgServer | None = None
    zone: Any = None
    started = time.perf_counter()
    try:
        if args.queue == "postgresql":
            pg = PgServer()
            pg.start()
            postmaster = pg.postmaster_pid()
            if postmaster is not None:  # its backends do the relay's work: not "other" load
                OUR_SESSIONS.add(os.getsid(postmaster))
                OUR_PARENTS.add(postmaster)
            log(f"PostgreSQL ({pg.bindir}) on 127.0.0.1:{pg.port}, data in {pg.data}")
        if not p.skip_postfix:
            restart_default = postfix.stop_default_instance()  # it may hold *:25
        for host, port in [(RELAY_HOST, relay_port), (FULL_HOST, full_port)] + (
                [] if p.skip_postfix else [(POSTFIX_HOST, 25)]):
            if not port_free(host, port):
                raise SystemExit(f"{host}:{port} is in use")
        relay = Relay(work / "relay", RELAY_HOST, relay_port, free_port(PRIMARY_HOST), trash,
                      pg)
        full = Relay(work / "relay-full", FULL_HOST, full_port, free_port(PRIMARY_HOST), trash,
                     pg)
        servers: list[Server] = [relay]
        relay.start()
        if not p.skip_postfix:
            pf = Postfix(work / "postfix", free_port(PRIMARY_HOST), trash)
            pf.start()
            servers.append(pf)
        log(f"servers up: mx-relay on {relay.host}:{relay.port}"
            + ("" if pf is None else f", Postfix on {pf.host}:{pf.port}")
            + f"; work dir {work}")

        if args.verify_spf:
            zone = spf_zone()
            checked = Relay(work / "relay-checks", FULL_HOST, full_port,
                            relay.sink_port, trash, pg,
                            spf_dns="{}:{}".format(*zone.address), verify="learned")
            full = checked  # stopped with the others
            run_verify_spf(relay, checked, p, figures)
        else:
            run_accept(servers, p, figures)
            run_drain(servers, p, figures["drain"])
            if pf is not None:
                pf.stop()  # idle from here on; the machine is the relay's
            if p.prefill:
                run_prefilled(relay, full, p, figures)
            if p.rss_queue:
                run_rss(relay, p, figures["rss"])
    except KeyboardInterrupt:
        log("interrupted: stopping servers")
        raise SystemExit(130) from None
    except SystemExit:
        if relay is not None and relay.log_tail():
            log(f"relay log tail:\n{relay.log_tail()}")
        if pf is not None:
            log(f"postfix maillog tail:\n{pf.instance.log_tail()}")
        raise
    finally:
        with suppress(KeyboardInterrupt):
            for r in (relay, full):
                if r is not None:
                    r.stop()
            if pf is not None:
                pf.stop()
            if restart_default:
                postfix.start_default_instance()
            if pg is not None:
                pg.stop()
            if zone is not None:
                zone.stop()
            if os.environ.get("BENCH_KEEP") is None:
                shutil.rmtree(work, ignore_errors=True)

    minutes = (time.perf_counter() - started) / 60
    env = environment()
    env["queue"] = args.queue
    if pg is not None:
        env["postgresql"] = pg.version
    env["load_1min_start"] = f"{load_before:.2f}"  # other work on the machine: noisier figures
    env["load_1min_end"] = f"{os.getloadavg()[0]:.2f}"
    print(f"\nmx-relay vs Postfix {env.get('postfix', '')} as a backup MX: {SIZE // 1000} KB "
          f"messages, one per connection (smtp-source), {p.messages:,} per accept figure, "
          f"median of {p.runs} run(s) (min-max); {env['cores']} cores, Python {env['python']}, "
          + (f"SQLite {env['sqlite']}" if pg is None else
             f"PostgreSQL {env['postgresql']} queue (fsync on)")
          + f"; {minutes:.0f} min; load average "
          f"{env['load_1min_start']} at start\n")
    print(table([f for key, f in figures.items() if key != "empty"]))
    other = max((o for f in figures.values() for o in f.other), default=0.0)
    print("\nratio = mx-relay / Postfix (msg/s: above 1 is mx-relay faster; ms: above 1 is "
          "mx-relay slower); the already-queued row compares with mx-relay on an empty "
          f"queue, measured in turns with it. Other processes used at most {other:.2f} cores "
          f"during a measurement (over {p.max_other}: measured again; * where one still was).")
    if args.json:
        args.json.write_text(json.dumps({
            "params": {"messages": p.messages, "runs": p.runs, "drain": p.drain,
                       "max_other": p.max_other,
                       "prefill": p.prefill, "rss_queue": p.rss_queue, "size": SIZE,
                       "sessions": SESSIONS, "latency_messages": p.latency_messages},
            "environment": env,
            "figures": {key: f.as_json() for key, f in figures.items()
                        if f.relay or f.postfix},
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
