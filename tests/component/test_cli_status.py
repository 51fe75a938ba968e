"""`relay status [--json]` over the real CLI, on SQLite and PostgreSQL: the
queue, the destinations that have mail or are down, the nodes (SPEC Part 2
"Operating it day to day")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from relay.ops.cli import queue_select
from relay.queue.access import Queue
from relay.queue.nodes import Node
from relay.queue.rows import Selector
from tests.component.test_cli_operator import NOW, T0, fail_site, msg, run, write_config

STATUS_KEYS = {"queue", "destinations", "nodes"}
QUEUE_KEYS = {"url", "revision", "by_state", "total", "oldest_age_seconds"}
DESTINATION_KEYS = {"destination", "up", "since", "last_reply", "next_probe_at", "messages"}
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from relay.core.clock import FakeClock

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.delenv("RELAY_QUEUE_URL", raising=False)
    monkeypatch.setattr(queue_select, "clock", FakeClock(NOW))
    yield


@pytest.fixture
def cfg(tmp_path: Path, queue: Queue) -> Path:
    return write_config(tmp_path / "relay.toml", queue)


@pytest.fixture
def busy(queue: Queue) -> Queue:
    """verrotech.com down since T0+30m with two messages (one held); other.example
    up with one; gone.example down with nothing left queued for it."""
    queue.put_many([msg("01A"), msg("01B"), msg("01C", "c@other.example"),
                    msg("01G", "g@gone.example")])
    fail_site(queue, "01A")
    queue.hold(Selector(ids=("01B",)))
    fail_site(queue, "01G", "gone.example")
    queue.delete(Selector(ids=("01G",)))
    return queue


def status_json(cfg: Path) -> dict:  # type: ignore[type-arg]
    result = run("status", "--json", "-c", str(cfg))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_json_has_the_spec_shape_and_the_down_destination(busy: Queue, cfg: Path) -> None:
    data = status_json(cfg)
    assert set(data) == STATUS_KEYS
    assert set(data["queue"]) == QUEUE_KEYS
    assert data["queue"]["by_state"] == {"active": 0, "deferred": 2, "hold": 1}
    assert data["queue"]["total"] == 3
    assert data["queue"]["oldest_age_seconds"] == int((NOW - T0).total_seconds())
    assert data["queue"]["revision"] == queue_select.shipped_head()
    assert data["nodes"] == []  # no relay serve has run on this queue
    for d in data["destinations"]:
        assert set(d) >= DESTINATION_KEYS
        for key in ("since", "next_probe_at"):
            assert d[key] is None or ISO.match(d[key])
    by_name = {d["destination"]: d for d in data["destinations"]}
    assert list(by_name) == ["verrotech.com", "gone.example", "other.example"]  # down first
    assert by_name["verrotech.com"] == {
        "destination": "verrotech.com", "up": False, "state": "down",
        "since": "2026-03-01T12:30:00Z", "last_reply": "refused",
        "next_probe_at": "2026-03-01T15:00:00Z", "messages": 2,
    }
    assert by_name["gone.example"]["messages"] == 0  # down: listed without mail
    assert by_name["other.example"] == {
        "destination": "other.example", "up": True, "state": "up", "since": None,
        "last_reply": None, "next_probe_at": None, "messages": 1,
    }


def test_a_destination_that_answers_again_leaves_the_view_with_its_mail(
    busy: Queue, cfg: Path
) -> None:
    assert run("queue", "flush", "--domain", "gone.example", "-c", str(cfg)).exit_code == 0
    assert run("queue", "delete", "--yes", "--domain", "other.example",
               "-c", str(cfg)).exit_code == 0
    names = [d["destination"] for d in status_json(cfg)["destinations"]]
    assert names == ["verrotech.com"]


def test_a_probe_running_has_no_next_probe_time(busy: Queue, cfg: Path) -> None:
    assert busy.start_probes(NOW + timedelta(hours=2), stale_before=T0) == ["verrotech.com"]
    by_name = {d["destination"]: d for d in status_json(cfg)["destinations"]}
    assert (by_name["verrotech.com"]["state"], by_name["verrotech.com"]["next_probe_at"]) == (
        "probing", None)
    assert "gone.example" not in by_name  # nothing waited on it: forgotten


def test_text_is_a_short_table(busy: Queue, cfg: Path) -> None:
    result = run("status", "-c", str(cfg))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 10
    assert lines[0].startswith("queue:        ") and "(revision " in lines[0]
    assert lines[1] == "messages:     3 (0 active, 2 deferred, 1 hold); oldest 2h"
    assert lines[2] == "destinations: 3 with mail or down, 2 down"
    assert re.match(r"^  DESTINATION +STATE +DOWN FOR +NEXT PROBE +MESSAGES +LAST REPLY$",
                    lines[3])
    assert re.match(r"^  verrotech\.com +down +1h 30m +in 1h +2  refused$", lines[4])
    assert re.match(r"^  other\.example +up +- +- +1  -$", lines[6])
    assert lines[-1].startswith("nodes:")


def test_an_empty_queue(queue: Queue, cfg: Path) -> None:
    data = status_json(cfg)
    assert data["queue"]["total"] == 0 and data["destinations"] == []
    text = run("status", "-c", str(cfg)).stdout
    assert "destinations: none with mail, none down" in text
    assert "oldest" not in text


def test_an_uninitialised_database_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[queue]\nurl = "sqlite:///{tmp_path}/none.db"\n')
    result = run("status", "-c", str(cfg))
    assert (result.exit_code, result.stderr) == (
        1, f"relay: database not initialised: run relay db upgrade (queue: {tmp_path}/none.db)\n")


def test_status_help_loads_no_database_library() -> None:
    probe = ("import sys\nfrom relay.ops.cli.main import main\n"
             "sys.argv = ['relay', 'status', '--help']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(sorted({m.partition('.')[0] for m in sys.modules} & "
             "{'sqlalchemy', 'pydantic', 'alembic'}), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stderr.strip().splitlines()[-1] == "[]"
    assert "--json" in result.stdout


def test_the_table_stays_short_with_many_destinations(queue: Queue, cfg: Path) -> None:
    queue.put_many([msg(f"01M{n:02}", f"x@d{n:02}.example") for n in range(25)])
    fail_site(queue, "01M24", "d24.example")
    lines = run("status", "-c", str(cfg)).stdout.splitlines()
    assert lines[2] == "destinations: 25 with mail or down, 1 down"
    assert re.match(r"^  d24\.example +down ", lines[4])  # down ones first
    assert len([line for line in lines if re.match(r"^  d\d\d\.example ", line)]) == 20
    assert "  ... and 5 more (relay status --json lists every one)" in lines
    assert len(status_json(cfg)["destinations"]) == 25


def test_nodes_are_the_registry_as_relay_nodes_shows_it(busy: Queue, cfg: Path) -> None:
    """`nodes` in `relay status --json` is `relay nodes --json`; the text form
    counts the nodes up (seen within one lease) among those seen lately."""
    up = Node("mx1.example/4242/aa", "mx1.example", 4242, T0)
    gone = Node("mx2.example/77/bb", "mx2.example", 77, T0)
    busy.heartbeat(up, NOW - timedelta(seconds=5), alive_until=NOW + timedelta(minutes=2))
    busy.heartbeat(gone, NOW - timedelta(hours=1), alive_until=NOW - timedelta(minutes=58))
    nodes = run("nodes", "--json", "-c", str(cfg))
    assert nodes.exit_code == 0, nodes.stderr
    listed = json.loads(nodes.stdout)
    assert sorted(n["id"] for n in listed) == sorted([gone.id, up.id])
    assert status_json(cfg)["nodes"] == listed
    text = run("status", "-c", str(cfg)).stdout
    assert "nodes:        1 up of 2 seen lately" in text
