"""`relay recipients ...` against a real SQLite queue: list, forget, import and
their refusals (a bad import line names its place and imports nothing)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from relay.core.recipients import KnownState, Learned
from relay.ops.cli.main import command_tree
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import Attempt, NewMessage

JSON_KEYS = {"address", "state", "source", "learned_at", "last_seen_at"}


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.delenv("RELAY_QUEUE_URL", raising=False)
    path = tmp_path / "relay.toml"
    path.write_text(f'[queue]\nurl = "sqlite:///{tmp_path}/queue.db"\n\n'
                    '[domains."company.example"]\nverify = "learned"\n'
                    'verify_invalid_ttl = "1h"\n')
    return path


@pytest.fixture
def queue(tmp_path: Path, config: Path) -> Iterator[Queue]:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    db.upgrade(engine)
    yield Queue(engine)
    engine.dispose()


def relay(config: Path, *args: str) -> Result:
    return CliRunner().invoke(command_tree(), ["-c", str(config), "recipients", *args])


def learn(queue: Queue, qid: str, at: datetime, *learned: Learned) -> None:
    """What a recorded delivery attempt stores."""
    queue.put_many([NewMessage(qid, "", ("x@company.example",), b"x", at)])
    [claimed] = queue.claim_ids([qid], "me", at, 3600)
    queue.apply([Attempt(message_id=qid, owner="me", lease_until=claimed.lease_until, at=at,
                         recipients=(), next_attempt_at=at, learned=learned)])


def test_import_then_list_as_json_and_as_a_table(queue: Queue, config: Path,
                                                 tmp_path: Path) -> None:
    listing = tmp_path / "staff.txt"
    listing.write_text("# staff\nann\n\nBob@Company.Example\n")
    result = relay(config, "import", str(listing), "--domain", "COMPANY.example")
    assert result.exit_code == 0, result.output
    assert result.output == "imported 2 addresses of company.example as known-valid\n"

    rows = json.loads(relay(config, "list", "--json").output)
    assert [(r["address"], r["state"], r["source"]) for r in rows] == [
        ("ann@company.example", "valid", "import"), ("Bob@Company.Example", "valid", "import")]
    assert all(set(r) == JSON_KEYS and r["learned_at"].endswith("Z") for r in rows)
    table = relay(config, "list").output.splitlines()
    assert table[0].split() == ["STATE", "SOURCE", "LAST", "SEEN", "ADDRESS"]
    assert table[1].split()[:2] == ["valid", "import"] and table[1].endswith("ann@company.example")


def test_a_file_with_one_bad_line_is_refused_whole(queue: Queue, config: Path,
                                                   tmp_path: Path) -> None:
    listing = tmp_path / "mixed.txt"
    listing.write_text("ann\nbob@company.example\n\n# a comment\ncy@other.example\n")
    result = CliRunner().invoke(command_tree(), ["-c", str(config), "recipients", "import",
                                                 str(listing), "--domain", "company.example"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{listing}:5: 'cy@other.example' is not an address of company.example",
        f"relay: {listing}: nothing imported",
    ]
    assert queue.known_recipients() == []


def test_list_filters_by_domain_and_state_and_leaves_out_what_expired(
        queue: Queue, config: Path) -> None:
    now = datetime.now(UTC)
    learn(queue, "M1", now - timedelta(hours=2),
          Learned("old@company.example", KnownState.INVALID))
    learn(queue, "M2", now, Learned("bob@company.example", KnownState.INVALID),
          Learned("ann@company.example", KnownState.VALID))
    queue.import_recipients(["x@elsewhere.example"], now)

    def addresses(*args: str) -> list[str]:
        result = relay(config, "list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [r["address"] for r in json.loads(result.output)]

    # old@ was refused two hours ago and verify_invalid_ttl is 1h: forgotten
    assert addresses() == ["ann@company.example", "bob@company.example", "x@elsewhere.example"]
    assert addresses("--state", "invalid") == ["bob@company.example"]
    assert addresses("--domain", "company.example", "--state", "valid") == [
        "ann@company.example"]
    assert relay(config, "list", "--domain", "no such").exit_code == 1


def test_forget_takes_any_spelling_and_is_idempotent(queue: Queue, config: Path) -> None:
    queue.import_recipients(["ann@company.example", "bob@company.example"], datetime.now(UTC))
    result = relay(config, "forget", "ANN@Company.Example", "nobody@company.example")
    assert result.exit_code == 0, result.output
    assert result.output == "forgot 1 of 2 addresses\n  ann@company.example\n"
    assert relay(config, "forget", "ANN@Company.Example").output == "forgot 0 of 1 addresses\n"
    assert [r.key for r in queue.known_recipients()] == ["bob@company.example"]
    bad = relay(config, "forget", "not-an-address")
    assert bad.exit_code == 1 and "bad address 'not-an-address'" in bad.stderr


def test_a_database_not_initialised_is_one_line(config: Path) -> None:
    result = relay(config, "list")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "relay: database not initialised: run relay db upgrade (queue: ")
