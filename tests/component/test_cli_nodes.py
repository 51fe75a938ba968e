"""`relay nodes [--json]` on a real SQLite queue with registered nodes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from relay.core.clock import FakeClock
from relay.ops.cli import queue_select
from relay.ops.cli.main import command_tree
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.nodes import Node
from relay.queue.rows import NewMessage

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 120.0


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Queue]]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.delenv("RELAY_QUEUE_URL", raising=False)
    monkeypatch.setattr(queue_select, "clock", FakeClock(NOW))
    url = f"sqlite:///{tmp_path}/queue.db"
    engine = db.connect(url)
    db.upgrade(engine)
    path = tmp_path / "relay.toml"
    path.write_text(f'[node]\nhostname = "mx2.example"\n\n[queue]\nurl = "{url}"\n')
    yield path, Queue(engine)
    engine.dispose()


def run(*args: str) -> Result:
    return CliRunner().invoke(command_tree(), list(args), catch_exceptions=False)


def test_nodes_json_has_the_spec_shape_and_counts_active_deliveries(
    cfg: tuple[Path, Queue],
) -> None:
    path, queue = cfg
    up = Node("mx2.example/41/aa", "mx2.example", 41, NOW - timedelta(hours=1), ("127.0.0.2",))
    gone = Node("mx3.example/42/bb", "mx3.example", 42, NOW - timedelta(hours=2))
    queue.heartbeat(gone, NOW - timedelta(minutes=30), NOW - timedelta(minutes=28))
    queue.heartbeat(up, NOW - timedelta(seconds=10), NOW + timedelta(seconds=LEASE - 10))
    queue.put_many([NewMessage(id=f"0{i}", sender="s@x.example", recipients=("a@y.example",),
                               data=b"x\r\n", received_at=NOW) for i in range(3)])
    queue.claim_due(up.id, NOW, limit=2, lease=LEASE)

    result = run("nodes", "--json", "-c", str(path))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"id": "mx3.example/42/bb", "hostname": "mx3.example", "pid": 42,
         "started_at": "2026-03-01T10:00:00Z", "last_seen_at": "2026-03-01T11:30:00Z",
         "active_deliveries": 0},
        {"id": "mx2.example/41/aa", "hostname": "mx2.example", "pid": 41,
         "started_at": "2026-03-01T11:00:00Z", "last_seen_at": "2026-03-01T11:59:50Z",
         "active_deliveries": 2},
    ]
    table = run("nodes", "-c", str(path)).stdout.splitlines()
    assert table[0].split() == ["ID", "HOSTNAME", "PID", "STATE", "STARTED", "LAST", "SEEN",
                                "ACTIVE"]
    assert table[1].split()[:4] == ["mx3.example/42/bb", "mx3.example", "42", "gone"]
    assert table[2].split()[:4] == ["mx2.example/41/aa", "mx2.example", "41", "up"]
    assert table[2].split()[-1] == "2"


def test_no_nodes_yet(cfg: tuple[Path, Queue]) -> None:
    path, _ = cfg
    assert run("nodes", "--json", "-c", str(path)).stdout.strip() == "[]"
    assert run("nodes", "-c", str(path)).stdout == "no node has run on this queue lately\n"


def test_an_uninitialised_database_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text(f'[queue]\nurl = "sqlite:///{tmp_path}/none.db"\n')
    result = run("nodes", "-c", str(path))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"relay: database not initialised: run relay db upgrade (queue: {tmp_path}/none.db)")
