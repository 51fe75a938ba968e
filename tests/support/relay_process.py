"""`relay serve` as a real subprocess, for end-to-end tests.

Readiness and progress are read from the relay's own log lines (an event),
never guessed with sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

READY = "mx-relay ready"


def free_port(*hosts: str) -> int:
    """A TCP port free on every one of `hosts` (loopback aliases)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        ok = True
        for host in hosts:
            with socket.socket() as other:
                try:
                    other.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError(f"no common free port on {hosts}")


class RelayProcess:
    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, wait: bool = True, timeout: float = 20.0) -> RelayProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "-c", str(self.config), "serve"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=self.env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_for(re.escape(READY), timeout=timeout)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()
        self.proc.stderr.close()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20.0) -> None:
        """Block until `count` log lines match `pattern` (or the process dies)."""
        regex = re.compile(pattern)

        def seen() -> bool:
            matched = sum(1 for line in self.lines if regex.search(line))
            return matched >= count or (self.proc is not None and self.proc.poll() is not None
                                        and not (self._reader and self._reader.is_alive()))

        with self._cond:
            if not self._cond.wait_for(seen, timeout=timeout):
                raise AssertionError(f"timed out waiting for {pattern!r} x{count}; log:\n"
                                     + "\n".join(self.lines[-40:]))
            matched = sum(1 for line in self.lines if regex.search(line))
        if matched < count:
            raise AssertionError(f"relay exited before {pattern!r}; log:\n{self.log[-4000:]}")

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        if self._reader:
            self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self._reader:
            self._reader.join(timeout=5)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.kill()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `relay -c CONFIG ARGS...` against the same config (and queue)."""
        return subprocess.run(
            [sys.executable, "-m", "relay", "-c", str(self.config), *args],
            capture_output=True, text=True, env=self.env, timeout=60, check=False,
        )

    def queue_list(self) -> list[dict[str, Any]]:
        result = self.cli("queue", "list", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def relay_process() -> Iterator[type[RelayProcess]]:
    """A factory for relay subprocesses; all are killed at teardown."""
    started: list[RelayProcess] = []

    class Tracked(RelayProcess):
        def start(self, wait: bool = True, timeout: float = 20.0) -> RelayProcess:
            started.append(self)
            return super().start(wait, timeout)

    yield Tracked
    for process in started:
        process.stop_quietly()
