"""Pieces every benchmark shares: ports, a discard sink, the relay command, RSS."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
SINK_HOST = "127.0.0.2"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def body(n: int, size: int) -> bytes:
    head = (f"From: <bench@sender.example>\r\nTo: <user@bench.example>\r\n"
            f"Subject: bench {n}\r\nMessage-ID: <b{n}@sender.example>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class DiscardSink:
    """A minimal SMTP sink in a thread: answers everything 250, counts messages."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.count = 0
        self.sessions = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._session, self.host, self.port, backlog=512))
        self._ready.set()
        self._loop.run_until_complete(server.serve_forever())

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        writer.write(b"220 sink ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink\r\n250-8BITMIME\r\n250-PIPELINING\r\n"
                                 b"250 SIZE 100000000\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    while await reader.readline() not in (b".\r\n", b""):
                        pass
                    self.count += 1
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()


def relay_config(listen: str, url: str, next_hop: str, backoff: tuple[str, str] = ("1h", "1h"),
                 log_level: str = "warning", spf_dns: str = "", verify: str = "off") -> str:
    """The relay's config for a benchmark: backup MX of bench.example, sending
    to `next_hop`, no per-client limits (one load generator makes all the
    connections), no metrics listener. SPF only with `spf_dns` ("ip:port" of
    a DNS server to ask): a benchmark never asks DNS outside this machine.
    $BENCH_QUEUE: more `[queue]` lines, for turns with and without a setting
    (`BENCH_QUEUE='commit_delay = 0'`)."""
    dns = f'[dns]\nnameservers = ["{spf_dns}"]\n' if spf_dns else ""
    more_queue = os.environ.get("BENCH_QUEUE", "").replace(";", "\n")
    return f"""\
[node]
hostname = "bench-relay.example"
[smtp]
listen = ["{listen}"]
max_connections_per_ip = 1000
max_messages_per_ip_per_minute = 0
spf = {"true" if spf_dns else "false"}
{dns}[queue]
url = "{url}"
{more_queue}
[delivery]
min_backoff = "{backoff[0]}"
max_backoff = "{backoff[1]}"
connect_timeout = "2s"
[metrics]
listen = ""
[log]
level = "{log_level}"
[domains."bench.example"]
next_hop = "{next_hop}"
verify = "{verify}"
"""


def relay_cmd(config: Path, *args: str) -> list[str]:
    profile = os.environ.get("BENCH_PROFILE")  # a path: cProfile the relay's event loop thread
    if profile and args[:1] == ("serve",):
        return [sys.executable, "-m", "cProfile", "-o", profile, "-m", "relay", "-c",
                str(config), *args]
    return [sys.executable, "-m", "relay", "-c", str(config), *args]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def queue_total(config: Path) -> int:
    out = subprocess.run(relay_cmd(config, "queue", "stats", "--json"), capture_output=True,
                         text=True, check=True)
    return int(json.loads(out.stdout)["total"])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0




def flush_and_drain(config: Path, sink: DiscardSink, messages: int, limit: float) -> float:
    """Flush the relay's queue into `sink`; seconds until it has every message."""
    started = time.perf_counter()
    subprocess.run(relay_cmd(config, "queue", "flush", "--all"), check=True,
                   capture_output=True)
    while sink.count < messages:
        if time.perf_counter() - started > limit:
            raise SystemExit(f"drain stalled at {sink.count} of {messages}")
        time.sleep(0.05)  # a benchmark harness polling a counter
    return time.perf_counter() - started


@dataclass(frozen=True)
class Tally:
    """What reached the primary of what the relay acknowledged."""

    drained: float  # seconds waited for the acknowledged ones
    got: collections.Counter[str]  # Message-IDs delivered, each with its count
    lost: list[str]  # acknowledged, never delivered
    duplicates: int  # deliveries beyond the first of a Message-ID


def tally_delivered(acknowledged: set[str], delivered: Callable[[], Iterable[str]],
                    limit: float) -> Tally:
    """Wait (at most `limit` s) until every acknowledged ID was delivered, then count.

    The one check of a loss benchmark: lost = acknowledged but never delivered.
    """
    began = time.monotonic()
    while not acknowledged <= set(delivered()):
        if time.monotonic() - began > limit:
            break
        time.sleep(0.5)  # a benchmark harness polling a counter
    drained = time.monotonic() - began
    got = collections.Counter(delivered())
    return Tally(drained=drained, got=got, lost=sorted(acknowledged - set(got)),
                 duplicates=sum(count - 1 for count in got.values() if count > 1))
