"""The demo's two relays, Hektor and Norwich, as `relay serve` subprocesses.

Owns each relay's config (written to the demo's temporary directory: its own
loopback address, its own SQLite queue, the demo's name server, short
backoff so the demo fits in seconds, JSON log lines), starting it and waiting
for its ready line, reading its log as it runs, stopping it with SIGTERM as
an operator would, and reading how many messages its queue holds from its
database. Refuses to deliver or decide anything: the relays do that
themselves, exactly as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from relay.ops.demo.zone import DOMAIN, Host
from relay.queue import db
from relay.queue.access import Queue

READY = "mx-relay ready"
STOP_TIMEOUT = 20.0  # seconds a relay gets to stop on SIGTERM before it is killed
_OVERRIDES = ("RELAY_CONFIG", "RELAY_QUEUE_URL", "RELAY_LISTEN")  # would replace our config

LogHandler = Callable[["RelayNode", dict[str, Any]], Awaitable[None]]


class DemoError(Exception):
    """Something kept the demo from running; one line for the user."""


def config_text(host: Host, port: int, queue_url: str, nameserver: str) -> str:
    """A relay config for `host` on loopback: the shipped one with demo timings."""
    return f"""\
# {host.label}: MX {host.preference} for {DOMAIN} in `relay demo`.

[node]
hostname = "{host.name}"

[smtp]
listen = ["{host.address}:{port}"]

[queue]
url = "{queue_url}"

[delivery]
port = {port}
connect_timeout = "2s"
min_backoff = "1s"
max_backoff = "2s"

[dns]
nameservers = ["{nameserver}"]
timeout = "2s"

[metrics]
listen = ""

[log]
format = "json"

[domains."{DOMAIN}"]
"""


class RelayNode:
    """One relay: its config file, its queue, and its process while it runs."""

    def __init__(self, host: Host, workdir: Path, port: int, nameserver: str,
                 on_log: LogHandler) -> None:
        self.host = host
        name = host.label.lower()
        self.config = workdir / f"{name}.toml"
        self.queue_url = f"sqlite:///{workdir / name / 'queue.db'}"
        self.config.write_text(config_text(host, port, self.queue_url, nameserver))
        self.tail: deque[str] = deque(maxlen=20)  # the last log lines, for errors
        self._on_log = on_log
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._engine: Engine | None = None
        self._queue: Queue | None = None

    @property
    def label(self) -> str:
        return self.host.label

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, timeout: float = 30.0) -> None:
        """Start `relay serve`; return once it logged its ready line."""
        env = {k: v for k, v in os.environ.items() if k not in _OVERRIDES}
        self._ready.clear()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "-c", str(self.config), "serve",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env,
            start_new_session=True,  # a Ctrl-C reaches the demo, which stops the relays once
        )
        self._reader = asyncio.create_task(self._read(self._proc))
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._reader}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not self._ready.is_set():
            await self.stop()
            last = self.tail[-1] if self.tail else "no output"
            raise DemoError(f"{self.label} did not start: {last}")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                self.tail.append(line)
                continue
            self.tail.append(str(record.get("message") or record))
            if str(record.get("message", "")).startswith(READY):
                self._ready.set()
            await self._on_log(self, record)

    async def stop(self) -> int | None:
        """SIGTERM, as an operator stops it; killed if it takes too long."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            await self._reader
        return proc.returncode

    async def held(self) -> int:
        """Messages in this relay's queue, read from its database (running or not)."""
        return await asyncio.to_thread(self._count)

    def _count(self) -> int:
        if self._proc is None:
            return 0  # never started: no queue yet
        if self._engine is None or self._queue is None:
            self._engine = db.connect(self.queue_url)
            self._queue = Queue(self._engine)
        return sum(self._queue.counts().values())

    def close(self) -> None:
        """Let go of the database (the process is stopped by `stop`)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = self._queue = None
