"""Accept and drain throughput of `relay serve`, printed as figures (not a test).

1. Starts the relay (subprocess, SQLite queue in a temp dir) with its only
   hosted domain's next hop on a closed port: the primary is down.
2. Sends N messages of ~SIZE bytes, one per connection, over C parallel
   sessions; reports accepted msg/s and DATA-end -> 250 latency percentiles.
3. Starts a discard sink on the next hop, flushes the queue and reports the
   drain rate (msg/s) until the queue is empty.

`--verify learned` turns on learned recipients for the domain, with `--known`
addresses (the benchmark's recipient among them) imported as known-valid
before the relay starts: every RCPT is then a known-valid check, and every
delivery teaches its recipient again.

    .venv/bin/python bench/throughput.py --messages 2000 --sessions 10
    .venv/bin/python bench/throughput.py --messages 2000 --sessions 10 --verify learned
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
)


async def send_one(port: int, data: bytes, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    for command in (b"EHLO bench.example\r\n", b"MAIL FROM:<bench@sender.example>\r\n",
                    b"RCPT TO:<user@bench.example>\r\n", b"DATA\r\n"):
        writer.write(command)
        answer = await reply()
        if answer[:1] not in (b"2", b"3"):
            raise RuntimeError(f"{command!r} -> {answer!r}")
    writer.write(data + b".\r\n")
    started = time.perf_counter()
    answer = await reply()
    latencies.append(time.perf_counter() - started)
    if not answer.startswith(b"250"):
        raise RuntimeError(f"DATA -> {answer!r}")
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()
    await writer.wait_closed()


async def accept_phase(
    port: int, messages: int, sessions: int, size: int
) -> tuple[float, list[float]]:
    payloads = [body(n, size) for n in range(messages)]
    latencies: list[float] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)

    async def worker() -> None:
        while not queue.empty():
            await send_one(port, queue.get_nowait(), latencies)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--verify", choices=("off", "learned"), default="off")
    parser.add_argument("--known", type=int, default=10_000,
                        help="known-valid addresses imported first (with --verify learned)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    relay_port, sink_port = free_port(HOST), free_port(SINK_HOST)
    config = work / "bench.toml"
    config.write_text(relay_config(f"{HOST}:{relay_port}", f"sqlite:///{work}/queue.db",
                                   f"[{SINK_HOST}]:{sink_port}")
                      + f'verify = "{args.verify}"\n')
    if args.verify == "learned":
        known = work / "known.txt"
        known.write_text("user\n" + "".join(f"user{n}\n" for n in range(args.known - 1)))
        subprocess.run(relay_cmd(config, "db", "upgrade"), check=True, capture_output=True)
        subprocess.run(relay_cmd(config, "recipients", "import", str(known),
                                 "--domain", "bench.example"), check=True, capture_output=True)
    proc = subprocess.Popen(relay_cmd(config, "serve", "--log-level", "WARNING"),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection((HOST, relay_port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("relay did not start") from None
                time.sleep(0.05)  # a benchmark harness, not a test: waiting for a port
        elapsed, latencies = asyncio.run(
            accept_phase(relay_port, args.messages, args.sessions, args.size))
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        print(f"verify = {args.verify}" + (f", {args.known} known-valid addresses"
                                            if args.verify == "learned" else ""))
        print(f"accept: {args.messages} msgs of ~{args.size} B over {args.sessions} sessions: "
              f"{args.messages / elapsed:.0f} msg/s; DATA->250 p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        assert queue_total(config) == args.messages

        sink = DiscardSink(SINK_HOST, sink_port)
        drained = flush_and_drain(config, sink, args.messages, limit=600)
        print(f"drain:  {args.messages} msgs to a local sink: {args.messages / drained:.0f} msg/s "
              f"over {sink.sessions} sessions")
        print(f"relay peak RSS: {rss_kb(proc.pid) / 1024:.0f} MB")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if os.environ.get("BENCH_KEEP") is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
