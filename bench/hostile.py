"""1,000 slow sessions next to 10 normal senders; printed as figures (not a test).

`relay serve` as a subprocess (bench/common.py's config, with
`smtp.max_connections` above the slow sessions and `smtp.max_inflight_data`
small, 64MB by default, so its bound shows), its next hop a discard sink.

1. Alone: `--normal` senders, each one session sending messages of `--size`
   bytes back to back for `--window` seconds: messages accepted a second.
2. The same while a child process holds `--slow` sessions, each sending one
   10 KB message slowly (`--chunk` bytes every `--pace` seconds, well above
   `smtp.min_data_rate`, so none is cut), then starting over: the normal
   senders' rate again, and its ratio to (1) (target >= 0.8).
3. The relay's RSS (/proc: VmRSS sampled each second, and VmHWM) against its
   idle RSS plus `max_inflight_data`.

    .venv/bin/python bench/hostile.py --slow 1000 --normal 10 --window 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    HOST,
    SINK_HOST,
    DiscardSink,
    body,
    free_port,
    relay_cmd,
    relay_config,
    stop_process,
)


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard one (children inherit it): 1,000
    sessions are 1,000 descriptors on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise RuntimeError(f"expected {code!r}, got {line!r}")
            return


async def normal_sender(port: int, data: bytes, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    await expect(reader, b"220")
    writer.write(b"EHLO normal.example\r\n")
    await expect(reader, b"250")
    while time.monotonic() < until:
        writer.write(b"MAIL FROM:<n@sender.example>\r\nRCPT TO:<user@bench.example>\r\nDATA\r\n")
        await expect(reader, b"250")
        await expect(reader, b"250")
        await expect(reader, b"354")
        writer.write(data + b".\r\n")
        await expect(reader, b"250")
        counts[0] += 1
    writer.write(b"QUIT\r\n")
    writer.close()


async def normal_phase(port: int, senders: int, size: int, window: float) -> float:
    counts = [0]
    data = body(0, size)
    began = time.monotonic()
    await asyncio.gather(*(normal_sender(port, data, began + window, counts)
                           for _ in range(senders)))
    return counts[0] / (time.monotonic() - began)


# -- the slow side (a child process of its own) ---------------------------------------


async def slow_session(port: int, chunk: int, pace: float, stats: dict[str, int],
                       stop: asyncio.Event) -> None:
    data = body(1, 10_000)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            await expect(reader, b"220")
            writer.write(b"EHLO slow.example\r\nMAIL FROM:<s@sender.example>\r\n"
                         b"RCPT TO:<user@bench.example>\r\nDATA\r\n")
            for code in (b"250", b"250", b"250", b"354"):
                await expect(reader, code)
            stats["in_data"] += 1
            for at in range(0, len(data), chunk):
                writer.write(data[at:at + chunk])
                await writer.drain()
                await asyncio.sleep(pace)  # the slow client's pace: its traffic, not a wait
            writer.write(b".\r\n")
            await expect(reader, b"250")
            stats["in_data"] -= 1
            stats["accepted"] += 1
            writer.write(b"QUIT\r\n")
            writer.close()
        except (ConnectionError, RuntimeError, OSError) as exc:
            stats["failed"] += 1
            stats.setdefault(type(exc).__name__, 0)
            stats[type(exc).__name__] += 1
            await asyncio.sleep(pace)


async def slow_side(port: int, sessions: int, chunk: int, pace: float) -> None:
    """Hold `sessions` slow sessions until stdin closes; say `ready` once all are in DATA."""
    stats = {"in_data": 0, "accepted": 0, "failed": 0}
    stop = asyncio.Event()
    tasks = []
    for _ in range(sessions):
        tasks.append(asyncio.create_task(slow_session(port, chunk, pace, stats, stop)))
        await asyncio.sleep(0.002)  # connect them over two seconds, not in one burst
    while stats["in_data"] < sessions * 0.95:
        await asyncio.sleep(0.1)  # a harness polling a counter
    print("ready", stats["in_data"], flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    print("slow", stats, flush=True)
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", type=int, default=1000)
    parser.add_argument("--normal", type=int, default=10)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--chunk", type=int, default=1000, help="bytes a slow client sends at once")
    parser.add_argument("--pace", type=float, default=1.0, help="seconds between its chunks")
    parser.add_argument("--inflight", default="64MB", help="smtp.max_inflight_data")
    parser.add_argument("--slow-side", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    limit = raise_nofile()
    if args.slow_side:
        asyncio.run(slow_side(args.slow_side, args.slow, args.chunk, args.pace))
        return

    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    sink = DiscardSink(SINK_HOST, free_port(SINK_HOST))
    port = free_port(HOST)
    config = tmp / "relay.toml"
    text = relay_config(f"{HOST}:{port}", f"sqlite:///{tmp}/queue.db",
                        f"{SINK_HOST}:{sink.port}", backoff=("1s", "1s"))
    text = text.replace("max_connections_per_ip = 1000",
                        f"max_connections_per_ip = {args.slow + args.normal + 100}\n"
                        f"max_connections = {args.slow + args.normal + 100}\n"
                        f'max_inflight_data = "{args.inflight}"')
    config.write_text(text)
    log = (tmp / "relay.log").open("w")
    relay = subprocess.Popen(relay_cmd(config, "serve"), stderr=log)
    slow: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                asyncio.run(normal_phase(port, 1, 1000, 0.1))
                break
            except OSError:
                if time.monotonic() > deadline or relay.poll() is not None:
                    raise SystemExit("relay did not start") from None
                time.sleep(0.2)  # a harness waiting for the relay to listen
        idle_rss = vm(relay.pid, "VmRSS")
        load0 = os.getloadavg()
        cpu0 = cpu_seconds(relay.pid)
        alone = asyncio.run(normal_phase(port, args.normal, args.size, args.window))
        cpu_alone = (cpu_seconds(relay.pid) - cpu0) / args.window
        slow = subprocess.Popen([sys.executable, __file__, "--slow", str(args.slow),
                                 "--chunk", str(args.chunk), "--pace", str(args.pace),
                                 "--slow-side", str(port)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert slow.stdout is not None and slow.stdin is not None
        ready = slow.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise SystemExit(f"the slow side did not get going: {ready}")
        rss_samples: list[int] = []

        async def sample(until: float) -> None:
            while time.monotonic() < until:
                rss_samples.append(vm(relay.pid, "VmRSS"))
                await asyncio.sleep(1.0)  # one sample a second

        async def loaded() -> float:
            until = time.monotonic() + args.window
            rate, _ = await asyncio.gather(
                normal_phase(port, args.normal, args.size, args.window), sample(until))
            return rate

        cpu0, slow_cpu0 = cpu_seconds(relay.pid), cpu_seconds(slow.pid)
        with_slow = asyncio.run(loaded())
        cpu_loaded = (cpu_seconds(relay.pid) - cpu0) / args.window
        slow_cpu = (cpu_seconds(slow.pid) - slow_cpu0) / args.window
        load1 = os.getloadavg()
        slow.stdin.write("\n")
        slow.stdin.flush()
        slow_stats = slow.stdout.readline().strip()
        slow.wait(60)
        hwm = vm(relay.pid, "VmHWM")
        inflight_kb = int(float(args.inflight.rstrip("MB")) * 1000)  # "64MB" as SI megabytes
        print(f"hostile: {args.slow} slow sessions ({args.chunk} bytes every {args.pace:g} s, "
              f"10 KB each) + {args.normal} normal senders of {args.size} bytes, "
              f"{args.window:g} s windows, RLIMIT_NOFILE {limit}")
        print(f"  normal senders alone: {alone:.0f} msg/s; with the slow sessions: "
              f"{with_slow:.0f} msg/s; ratio {with_slow / alone:.2f} (target >= 0.8)")
        print(f"  slow side: {ready[1]} in DATA at once; at the end {slow_stats}")
        print(f"  CPU (cores busy): relay alone {cpu_alone:.2f}, relay with the slow sessions "
              f"{cpu_loaded:.2f}, the slow side's own process {slow_cpu:.2f}")
        print(f"  relay RSS: idle {idle_rss / 1024:.0f} MB, peak sampled "
              f"{max(rss_samples) / 1024:.0f} MB, VmHWM {hwm / 1024:.0f} MB; bound "
              f"idle + max_inflight_data = {(idle_rss + inflight_kb) / 1024:.0f} MB")
        print(f"  load average before {load0[0]:.2f}, during {load1[0]:.2f} {load1[1]:.2f} "
              f"{load1[2]:.2f}")
    finally:
        if slow is not None and slow.poll() is None:
            slow.kill()
        stop_process(relay)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
