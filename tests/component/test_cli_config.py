"""A config's relative paths mean the same from any working directory, for real.

The `relay` command runs as a subprocess from a directory other than the
config's, against a real SQLite queue: `db upgrade`, `queue stats`,
`db current` and `check-config` all find (and show) the queue next to the
config; `relay serve`'s ready line names the same file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay import service
from relay.core import config
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import NewMessage

CONFIG = """\
[node]
hostname = "mx2.example.net"

[smtp]
listen = ["127.0.0.1:0"]

[queue]
url = "sqlite:///var/queue.db"

[metrics]
listen = ""
"""


def relay(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    directory = tmp_path / "etc" / "relay"
    directory.mkdir(parents=True)
    (directory / "relay.toml").write_text(CONFIG)
    return directory


def test_queue_is_found_next_to_the_config_from_any_directory(
    etc: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    config_path = str(etc / "relay.toml")
    database = etc / "var" / "queue.db"

    upgraded = relay(elsewhere, "-c", config_path, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"queue: {database}" in upgraded.stdout
    assert database.is_file()
    assert not (elsewhere / "var").exists()

    engine = db.connect(f"sqlite:///{database}")
    Queue(engine).put_many([NewMessage(
        id="01CFG", sender="s@sender.example", recipients=("a@verrotech.com",),
        data=b"Subject: x\r\n\r\nx\r\n", received_at=datetime(2026, 3, 1, tzinfo=UTC))])
    engine.dispose()

    stats = relay(elsewhere, "-c", config_path, "queue", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["total"] == 1
    assert not (elsewhere / "var").exists()  # no second, empty queue

    current = relay(elsewhere, "-c", config_path, "db", "current")
    assert current.returncode == 0, current.stderr
    assert current.stdout.splitlines()[0].endswith("(head)")
    assert current.stdout.splitlines()[1] == f"queue: {database}"

    checked = relay(elsewhere, "check-config", "-c", config_path)
    assert checked.returncode == 0, checked.stderr
    header, _, body = checked.stdout.partition("\n")
    assert header == f"# {config_path}: ok"
    effective = json.loads(body)
    assert effective["queue"]["url"] == f"sqlite:///{database}"


def test_bad_values_are_refused_by_check_config_and_serve(etc: Path, tmp_path: Path) -> None:
    (etc / "relay.toml").write_text(CONFIG + '\n[domains."verrotech.com"]\n'
                                    'next_hop = "mail.verrotech.com:"\n')
    for command in ("check-config", "serve"):
        result = relay(tmp_path, "-c", str(etc / "relay.toml"), command)
        assert result.returncode == 1
        assert result.stderr == (
            f"{etc}/relay.toml: domains.verrotech.com.next_hop: "
            "'mail.verrotech.com:': port must be a number from 0 to 65535\n"
        )


async def test_ready_line_names_the_resolved_queue(
    etc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_QUEUE_URL", raising=False)
    monkeypatch.delenv("RELAY_LISTEN", raising=False)
    cfg = config.load(etc / "relay.toml", env={})
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="relay.service")
    running = asyncio.create_task(service.serve(cfg, stop=stop, on_ready=stop.set))
    await asyncio.wait_for(running, 30)
    ready = [r.getMessage() for r in caplog.records if "mx-relay ready" in r.getMessage()]
    assert len(ready) == 1
    assert f"queue {etc}/var/queue.db, node " in ready[0]
    assert (etc / "var" / "queue.db").is_file()
