"""End to end: `relay demo` as a user runs it (SPEC "The seed's topology, runnable").

The demo starts its own name server, primary and two `relay serve`
processes on 127.0.0.10/20/30; the test runs it as a subprocess with TMPDIR
pointing into the test's tmp_path, so it can check that the demo's
temporary directory is gone and that no process started there is left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended while we looked
        if text in args:
            found.append(args)
    return found


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    # Settings that would override a relay's config must not reach the demo's relays.
    env = {**os.environ, "TMPDIR": str(tmp_path), "RELAY_CONFIG": str(tmp_path / "none.toml"),
           "RELAY_LISTEN": "127.0.0.99:1", "RELAY_QUEUE_URL": "sqlite:////nonexistent/q.db"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "relay", "demo", *args],
        capture_output=True, text=True, env=env, timeout=90, check=False,
    )
    return result, time.monotonic() - started


def test_demo_delivers_every_message_once_and_leaves_nothing_behind(tmp_path: Path) -> None:
    result, elapsed = run_demo(tmp_path, "--messages", "10")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert result.stdout.splitlines()[-1] == (
        "demo: 10 sent, 10 delivered to the primary, 0 lost, 0 duplicated")
    assert elapsed < 60
    assert "Traceback" not in output

    # The story: MX order while the primary is down, both relays holding mail,
    # each handing over what the sender gave it.
    assert len(re.findall(r"MX 10 primary: connection refused → MX 20 Hektor: queued as",
                          result.stdout)) == 5
    assert len(re.findall(r"MX 20 Hektor: connection refused → MX 30 Norwich: queued as",
                          result.stdout)) == 5
    assert "Hektor   stopped (SIGTERM)   holds: Hektor 5  Norwich 0  primary 0" in result.stdout
    for relay in ("Hektor", "Norwich"):
        assert len(re.findall(rf"{relay} +delivered <demo-\d+@sender\.example> to primary",
                              result.stdout)) == 5
    assert "holds: Hektor 0  Norwich 0  primary 10" in result.stdout

    assert list(tmp_path.iterdir()) == []  # the demo's directory, queues and configs: gone
    assert processes_mentioning(str(tmp_path)) == []  # no relay left running


def test_demo_refuses_too_few_messages(tmp_path: Path) -> None:
    result, _ = run_demo(tmp_path, "--messages", "1")
    assert result.returncode == 2
    assert "Invalid value for '--messages'" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_the_demo_and_its_relays_and_removes_its_directory(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", "--messages", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the relays are up once the story starts
            if line.startswith("1. The primary is down"):
                break
        else:
            raise AssertionError(f"demo ended early: {proc.wait()} {proc.stderr.read()}")
        assert processes_mentioning(str(tmp_path))  # the relays run from the demo's directory
        proc.send_signal(signal.SIGINT)
        rest, errors = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest + errors
    assert "Traceback" not in errors
    assert list(tmp_path.iterdir()) == []
    assert processes_mentioning(str(tmp_path)) == []
