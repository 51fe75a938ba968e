"""A long outage of the primary, then its recovery; printed as figures (not a test).

1. An empty queue: the relay's CPU over WINDOW seconds (the idle baseline).
2. N messages of ~SIZE bytes queued for a primary that is down (filled through
   the queue API, not SMTP: the accept path is measured by throughput.py).
   Over WINDOW seconds: the relay's CPU and its connection attempts.
3. The primary comes back (a discard sink on the next hop) and the operator
   flushes: drain rate until the queue is empty, sessions used, peak RSS.

    .venv/bin/python bench/outage.py --messages 100000 --window 60
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    HOST,
    SINK_HOST,
    DiscardSink,
    body,
    flush_and_drain,
    free_port,
    queue_total,
    relay_cmd,
    relay_config,
    rss_kb,
    stop_process,
)

from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import NewMessage, new_queue_id

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


class Relay:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self.handle = log.open("w")
        self.proc = subprocess.Popen(relay_cmd(config, "serve"), stderr=self.handle)
        deadline = time.time() + 60
        while "mx-relay ready" not in log.read_text():
            if time.time() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"relay did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)  # a benchmark harness waiting for a log line

    def attempts(self) -> int:
        return len(re.findall(r": attempt ", self.log.read_text()))

    def stop(self) -> None:
        stop_process(self.proc)
        self.handle.close()


def measure_idle(relay: Relay, window: float) -> tuple[float, int]:
    cpu0, attempts0 = cpu_seconds(relay.proc.pid), relay.attempts()
    time.sleep(window)
    cpu = cpu_seconds(relay.proc.pid) - cpu0
    return 100 * cpu / window, relay.attempts() - attempts0


def fill(url: str, messages: int, size: int) -> float:
    engine = db.connect(url)
    db.upgrade(engine)
    queue = Queue(engine)
    started = time.perf_counter()
    batch: list[NewMessage] = []
    for n in range(messages):
        batch.append(NewMessage(
            id=new_queue_id(), sender="bench@sender.example",
            recipients=("user@bench.example",), data=body(n, size),
            received_at=datetime.now(UTC), client_address="127.0.0.1",
        ))
        if len(batch) == 1000:
            queue.put_many(batch)
            batch = []
    if batch:
        queue.put_many(batch)
    engine.dispose()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=60.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="relay-outage-"))
    sink_port = free_port(SINK_HOST)
    url = f"sqlite:///{work}/queue.db"
    config = work / "outage.toml"
    config.write_text(relay_config(f"{HOST}:{free_port(HOST)}", url,
                                   f"[{SINK_HOST}]:{sink_port}", backoff=("10s", "20s"),
                                   log_level="info"))
    try:
        subprocess.run(relay_cmd(config, "db", "upgrade"), check=True, capture_output=True)
        relay = Relay(config, work / "idle.log")
        cpu, _ = measure_idle(relay, args.window)
        relay.stop()
        print(f"empty queue: relay CPU {cpu:.1f}% over {args.window:.0f} s")

        seconds = fill(url, args.messages, args.size)
        print(f"queued {args.messages} msgs of ~{args.size} B in {seconds:.0f} s "
              f"(database {sum(f.stat().st_size for f in work.glob('queue.db*')) >> 20} MB)")

        relay = Relay(config, work / "outage.log")
        time.sleep(3)  # the first pass discovers the outage; measure the steady state after
        cpu, attempts = measure_idle(relay, args.window)
        per_minute = attempts * 60 / args.window
        print(f"primary down, {args.messages} queued: relay CPU {cpu:.1f}%, "
              f"{attempts} connection attempts in {args.window:.0f} s ({per_minute:.1f}/min; "
              f"backoff 10s..20s)")

        sink = DiscardSink(SINK_HOST, sink_port)
        drained = flush_and_drain(config, sink, args.messages, limit=3600)
        print(f"primary back: drained {args.messages} msgs in {drained:.0f} s = "
              f"{args.messages / drained:.0f} msg/s over {sink.sessions} sessions")
        print(f"relay peak RSS: {rss_kb(relay.proc.pid) / 1024:.0f} MB")
        relay.stop()
        print(f"queue left: {queue_total(config)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
