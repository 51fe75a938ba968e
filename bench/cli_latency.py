"""How fast the operator's commands are; printed as figures (not a test).

1. `relay --help`: median wall time of ROUNDS runs.
2. `relay queue stats` on a migrated, empty SQLite queue: median of ROUNDS.
3. `relay queue flush --all` with a `relay serve` running on that queue: the
   time from starting the command to the first flushed message arriving at a
   live primary (a sink on the next hop), median of ROUNDS. Before each round
   one message is deferred: the primary answers 421 until the flush.

    .venv/bin/python bench/cli_latency.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import HOST, SINK_HOST, free_port, relay_config, stop_process

LIMIT = 30.0  # seconds any one step may take before the benchmark gives up


def relay_command(given: str | None) -> list[str]:
    """`--relay` (to compare builds), else the console script operators run, next to
    this interpreter, else `python -m relay`."""
    if given:
        return shlex.split(given)
    script = Path(sys.executable).parent / "relay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "relay"]


class SwitchSink:
    """A primary MX in a thread: `421` at the greeting while down, else accepts everything."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.up = False
        self.attempts = 0  # sessions refused while down
        self.count = 0  # messages accepted
        self.changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._session, self.host, self.port))
        ready.set()
        self._loop.run_until_complete(server.serve_forever())

    def _bump(self, counter: str) -> None:
        with self.changed:
            setattr(self, counter, getattr(self, counter) + 1)
            self.changed.notify_all()

    def wait(self, condition: Callable[[], bool]) -> None:
        with self.changed:
            if not self.changed.wait_for(condition, LIMIT):
                raise SystemExit("the relay never reached the sink")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self.up:
                writer.write(b"421 4.3.2 down\r\n")
                await writer.drain()
                self._bump("attempts")
                return
            writer.write(b"220 sink ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if not self.up:  # gone down since: a reused session fails too
                    writer.write(b"421 4.3.2 down\r\n")
                    await writer.drain()
                    self._bump("attempts")
                    break
                if verb == b"EHLO":
                    writer.write(b"250-sink\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    while await reader.readline() not in (b".\r\n", b""):
                        pass
                    writer.write(b"250 2.0.0 ok\r\n")
                    await writer.drain()
                    self._bump("count")
                    continue
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=LIMIT)
    return time.perf_counter() - started


def deferred(cmd: list[str]) -> bool:
    out = subprocess.run([*cmd, "queue", "list", "--json"], check=True, capture_output=True,
                         text=True, timeout=LIMIT).stdout
    return any(m["state"] == "deferred" and m["attempts"] >= 1 for m in json.loads(out))


def flush_latency(cmd: list[str], config: Path, relay_port: int, sink: SwitchSink) -> float:
    """One round: a message deferred by a 421, the primary back, then the flush."""
    sink.up = False
    attempts = sink.attempts
    with smtplib.SMTP(HOST, relay_port, timeout=LIMIT) as client:
        client.sendmail("bench@sender.example", ["user@bench.example"],
                        b"Subject: flush latency\r\n\r\nbody\r\n")
    sink.wait(lambda: sink.attempts > attempts)
    deadline = time.monotonic() + LIMIT
    while not deferred(cmd):  # the 421 recorded: a benchmark harness polling the queue
        if time.monotonic() > deadline:
            raise SystemExit("the message was never deferred")
    sink.up = True
    delivered = sink.count
    started = time.perf_counter()
    subprocess.run([*cmd, "queue", "flush", "--all"], check=True, capture_output=True,
                   timeout=LIMIT)
    sink.wait(lambda: sink.count > delivered)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--relay", metavar="CMD", help="the relay command to measure")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cli-latency-"))
    relay = None
    try:
        sink_port, relay_port = free_port(SINK_HOST), free_port(HOST)
        config = work / "relay.toml"
        config.write_text(relay_config(f"{HOST}:{relay_port}", f"sqlite:///{work}/queue.db",
                                       f"{SINK_HOST}:{sink_port}", log_level="info"))
        cmd = [*relay_command(args.relay), "-c", str(config)]
        subprocess.run([*cmd, "db", "upgrade"], check=True, capture_output=True)

        helps = [timed([*relay_command(args.relay), "--help"]) for _ in range(args.rounds)]
        stats = [timed([*cmd, "queue", "stats"]) for _ in range(args.rounds)]

        sink = SwitchSink(SINK_HOST, sink_port)
        relay = subprocess.Popen([*cmd, "serve"], stderr=subprocess.PIPE, text=True)
        assert relay.stderr is not None
        for line in relay.stderr:  # the relay says when it listens
            if "mx-relay ready" in line:
                break
        else:
            raise SystemExit("relay serve did not start")
        threading.Thread(target=relay.stderr.read, daemon=True).start()  # keep it draining
        flushes = [flush_latency(cmd, config, relay_port, sink) for _ in range(args.rounds)]

        def line(what: str, values: list[float]) -> str:
            runs = " ".join(f"{v:.3f}" for v in values)
            return f"{what:<44} median {statistics.median(values):.3f} s  ({runs})"

        print(line("relay --help", helps))
        print(line("relay queue stats (SQLite, empty)", stats))
        print(line("relay queue flush -> first message at primary", flushes))
    finally:
        if relay is not None:
            stop_process(relay)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
