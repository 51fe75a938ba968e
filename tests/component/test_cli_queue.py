"""`relay queue ...` against a real SQLite queue: every command, flag, format and exit code."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from relay.cluster import notify
from relay.core.clock import FakeClock
from relay.core.destination import AttemptOutcome
from relay.core.model import Outcome, RecipientStatus
from relay.delivery import outcomes
from relay.ops.cli import queue_select, queue_verbs, queue_views
from relay.ops.cli.main import command_tree, main_group
from relay.ops.cli.queue import valid_domain
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import Attempt, DestinationUpdate, NewMessage, RecipientUpdate, Selector

command_tree()  # every command group, as relay.ops.cli.main.main() builds them

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=2)
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
RAW = b"Received: from x\r\nSubject: caf\xc3\xa9 \xff\r\n\r\nline one\r\n\xe9t\xe9\r\n.. dots\r\n"

LIST_KEYS = {"id", "state", "sender", "size", "received_at", "next_attempt_at", "attempts",
             "last_error", "recipients", "node"}
RECIPIENT_KEYS = {"address", "status", "attempts", "last_reply"}
STATS_KEYS = {"total", "by_state", "by_domain", "oldest_age_seconds"}
REMOTE = "mail.verrotech.com[192.0.2.10]:25"


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    """No ambient config, a fixed "now"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.delenv("RELAY_QUEUE_URL", raising=False)
    fake = FakeClock(NOW)
    monkeypatch.setattr(queue_select, "clock", fake)
    yield fake


def write_config(path: Path, url: str, hostname: str = "mail.verrotech.net") -> Path:
    path.write_text(f'[node]\nhostname = "{hostname}"\n\n[queue]\nurl = "{url}"\n')
    return path


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    db.upgrade(engine)
    yield Queue(engine)
    engine.dispose()


@pytest.fixture
def cfg(tmp_path: Path, queue: Queue) -> Path:
    return write_config(tmp_path / "relay.toml", f"sqlite:///{tmp_path}/queue.db")


def msg(qid: str, *rcpts: str, sender: str = "s@sender.example", at: datetime = T0,
        data: bytes | None = None) -> NewMessage:
    if data is None:
        data = b"Subject: " + qid.encode() + b"\r\n\r\nx\r\n"
    return NewMessage(id=qid, sender=sender, recipients=rcpts or ("a@verrotech.com",), data=data,
                      received_at=at, client_address="198.51.100.7")


@pytest.fixture
def filled(queue: Queue) -> Queue:
    """01ACT active; 01DEF deferred after a 451; 01SPLIT + 01SPLIT.2 waiting; 01NUL a bounce."""
    queue.put_many([
        msg("01ACT", at=T0),
        msg("01DEF", "busy@verrotech.com", "ok@verrotech.com", at=T0 + timedelta(minutes=1)),
        msg("01SPLIT", "a@verrotech.com", "b@other.example", at=T0 + timedelta(minutes=2),
            data=RAW),
        msg("01NUL", "c@other.example", sender="", at=T0 + timedelta(minutes=3)),
    ])
    [deferred] = queue.claim_ids(["01DEF"], "n", T0 + timedelta(minutes=5), lease=600)
    busy, ok = deferred.recipients
    queue.record(Attempt(
        message_id="01DEF", owner="n",
        lease_until=deferred.lease_until, at=T0 + timedelta(minutes=5),
        recipients=(
            RecipientUpdate(busy.id, busy.address, RecipientStatus.DEFERRED,
                            "451 4.2.1 mailbox busy", Outcome.DEFERRED),
            RecipientUpdate(ok.id, ok.address, RecipientStatus.DELIVERED,
                            "250 2.0.0 ok", Outcome.DELIVERED),
        ),
        next_attempt_at=NOW + timedelta(minutes=10),
        last_error="451 4.2.1 mailbox busy",
        remote_host=REMOTE,
    ))
    queue.claim_ids(["01ACT"], "node", NOW, lease=600)
    return queue


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main_group, list(args), input=input, env=env,
                              catch_exceptions=False)


MAIL_LOG = re.compile(r"^\S+ \S+ INFO relay\.mail: (.*)$", re.M)


def mail_log(result: Result) -> list[str]:
    """The mail log lines a command wrote on stderr, without time and level."""
    return MAIL_LOG.findall(result.stderr)


def one_error_line(result: Result, code: int = 1) -> str:
    """The one error line on stderr (mail log lines of what was done aside)."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not MAIL_LOG.match(line)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("relay: ")
    return lines[0]


def listing(cfg: Path, *extra: str) -> list[dict[str, Any]]:
    result = run("queue", "list", "-c", str(cfg), "--json", *extra)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    return data


def check_message_shape(item: dict[str, Any], extra: frozenset[str] = frozenset(),
                        recipient_extra: frozenset[str] = frozenset()) -> None:
    assert set(item) == LIST_KEYS | extra
    assert isinstance(item["id"], str)
    assert item["state"] in ("active", "deferred", "hold")
    assert isinstance(item["sender"], str)
    assert isinstance(item["size"], int)
    assert ISO.match(item["received_at"])
    assert item["next_attempt_at"] is None or ISO.match(item["next_attempt_at"])
    assert isinstance(item["attempts"], int)
    assert isinstance(item["last_error"], str)
    for r in item["recipients"]:
        assert set(r) == RECIPIENT_KEYS | recipient_extra
        assert isinstance(r["address"], str)
        assert r["status"] in ("queued", "delivered", "deferred", "bounced")
        assert isinstance(r["attempts"], int)
        assert isinstance(r["last_reply"], str)


def state_of(queue: Queue, qid: str) -> str:
    view = queue.show(qid)
    assert view is not None, qid
    return view.state


# -- list --------------------------------------------------------------------------


def test_list_is_a_mailq_table(filled: Queue, cfg: Path) -> None:
    result = run("-c", str(cfg), "queue", "list")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0].startswith("-Queue ID-")
    assert re.search(r"^01ACT\* +\d+ 2026-03-01 12:00:00 +running +s@sender\.example$",
                     out, re.M)
    assert re.search(  # the next attempt: after its 451, in ten minutes
        r"^01DEF +\d+ 2026-03-01 12:01:00 +2026-03-01 14:10:00 +s@sender\.example$", out, re.M)
    assert re.search(r"^01NUL +\d+ 2026-03-01 12:03:00 +due now +MAILER-DAEMON$", out, re.M)
    assert re.search(r"^ +\(451 4\.2\.1 mailbox busy\)\n +busy@verrotech\.com$", out, re.M)
    assert re.search(r"^ +ok@verrotech\.com +\[delivered\]$", out, re.M)
    assert out.rstrip().splitlines()[-1] == "-- 1 Kbytes in 5 Requests."
    assert result.stderr == ""


def test_list_marks_held_messages_and_counts_kbytes(queue: Queue, cfg: Path) -> None:
    queue.put_many([msg("01BIG", data=b"x" * 5000)])
    assert run("queue", "hold", "01BIG", "-c", str(cfg)).exit_code == 0
    out = run("queue", "list", "-c", str(cfg)).stdout
    assert re.search(r"^01BIG! +5000 \S+ \S+ +on hold ", out, re.M)
    assert out.rstrip().endswith("-- 5 Kbytes in 1 Request.")


def test_list_of_an_empty_queue(queue: Queue, cfg: Path) -> None:
    result = run("queue", "list", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "Mail queue is empty\n")
    assert listing(cfg) == []


def test_list_json_has_the_spec_shape(filled: Queue, cfg: Path) -> None:
    data = listing(cfg)
    for item in data:
        check_message_shape(item)
    by_id = {m["id"]: m for m in data}
    assert list(by_id) == ["01ACT", "01DEF", "01NUL", "01SPLIT", "01SPLIT.2"]
    assert (by_id["01ACT"]["state"], by_id["01ACT"]["node"]) == ("active", "node")
    d = by_id["01DEF"]
    assert d == {
        "id": "01DEF", "state": "deferred", "sender": "s@sender.example",
        "size": d["size"], "received_at": "2026-03-01T12:01:00Z",
        "next_attempt_at": "2026-03-01T14:10:00Z", "attempts": 1,
        "last_error": "451 4.2.1 mailbox busy",
        "recipients": [
            {"address": "busy@verrotech.com", "status": "deferred", "attempts": 1,
             "last_reply": "451 4.2.1 mailbox busy"},
            {"address": "ok@verrotech.com", "status": "delivered", "attempts": 1,
             "last_reply": "250 2.0.0 ok"},
        ],
        "node": None,
    }
    assert by_id["01NUL"]["sender"] == ""
    assert by_id["01SPLIT"]["size"] == len(RAW)


def test_list_filters_by_domain_and_state(filled: Queue, cfg: Path) -> None:
    assert [m["id"] for m in listing(cfg, "--domain", "other.example")] == ["01NUL", "01SPLIT.2"]
    assert [m["id"] for m in listing(cfg, "--domain", "Other.Example.")] == [
        "01NUL", "01SPLIT.2"]
    assert [m["id"] for m in listing(cfg, "--state", "active")] == ["01ACT"]
    assert [m["id"] for m in listing(cfg, "--state", "hold")] == []
    assert [m["id"] for m in listing(cfg, "--state", "deferred", "--domain", "verrotech.com")] == [
        "01DEF", "01SPLIT"]
    assert listing(cfg, "--domain", "nothing-here.example") == []


def test_list_rejects_a_bad_domain_and_a_bad_state(filled: Queue, cfg: Path) -> None:
    line = one_error_line(run("queue", "list", "-c", str(cfg), "--domain", "no such/domain"))
    assert "bad domain" in line
    result = run("queue", "list", "-c", str(cfg), "--state", "frozen")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr


# -- config lookup ----------------------------------------------------------------


@pytest.fixture
def other_cfg(tmp_path: Path) -> Path:
    """A second queue holding one message, to tell which config was used."""
    engine = db.connect(f"sqlite:///{tmp_path}/other.db")
    db.upgrade(engine)
    Queue(engine).put_many([msg("01OTHER")])
    engine.dispose()
    return write_config(tmp_path / "other.toml", f"sqlite:///{tmp_path}/other.db")


def ids_of(result: Result) -> list[str]:
    assert result.exit_code == 0, result.stderr
    return [m["id"] for m in json.loads(result.stdout)]


def test_config_before_after_and_from_the_environment(
    filled: Queue, cfg: Path, other_cfg: Path
) -> None:
    assert "01ACT" in ids_of(run("-c", str(cfg), "queue", "list", "--json"))
    assert "01ACT" in ids_of(run("queue", "list", "--json", "-c", str(cfg)))
    assert "01ACT" in ids_of(run("queue", "--config", str(cfg), "list", "--json"))
    assert ids_of(run("queue", "list", "--json", env={"RELAY_CONFIG": str(other_cfg)})) == [
        "01OTHER"]
    # after the command words wins over before them, and both over $RELAY_CONFIG
    assert ids_of(run("-c", str(cfg), "queue", "list", "--json", "-c", str(other_cfg))) == [
        "01OTHER"]
    assert "01ACT" in ids_of(
        run("queue", "list", "--json", "-c", str(cfg), env={"RELAY_CONFIG": str(other_cfg)}))


def test_every_command_takes_config_after_the_command_words(filled: Queue, cfg: Path) -> None:
    for args in (["list"], ["show", "01DEF"], ["stats"], ["flush", "01DEF"], ["hold", "01DEF"],
                 ["release", "01DEF"], ["delete", "01SPLIT", "--yes"], ["bounce", "01NUL"]):
        result = run("queue", *args, "-c", str(cfg))
        assert result.exit_code == 0, (args, result.stderr)


def test_config_file_problems_are_reported_without_a_traceback(tmp_path: Path) -> None:
    result = run("queue", "list", "-c", str(tmp_path / "missing.toml"))
    assert result.exit_code == 1
    assert "missing.toml: file not found" in result.stderr
    assert "Traceback" not in result.stderr


# -- show --------------------------------------------------------------------------


def test_show_human_has_envelope_state_recipients_and_history(filled: Queue, cfg: Path) -> None:
    result = run("queue", "show", "01DEF", "-c", str(cfg))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert re.search(r"^Queue ID: +01DEF$", out, re.M)
    assert re.search(r"^State: +deferred$", out, re.M)
    assert re.search(r"^Sender: +<s@sender\.example>$", out, re.M)
    assert re.search(r"^Destination: +verrotech\.com$", out, re.M)
    assert re.search(r"^Received: +2026-03-01 12:01:00 UTC \(1h 59m ago\) from 198\.51\.100\.7$",
                     out, re.M)
    assert re.search(r"^Attempts: +1$", out, re.M)
    assert re.search(r"^Next attempt: +2026-03-01 14:10:00 UTC \(in 10m\)$", out, re.M)
    assert re.search(r"^Last error: +451 4\.2\.1 mailbox busy$", out, re.M)
    assert re.search(r"<busy@verrotech\.com> +deferred +attempts 1 +451 4\.2\.1 mailbox busy$",
                     out, re.M)
    assert re.search(r"<ok@verrotech\.com> +delivered +attempts 1 +250 2\.0\.0 ok$", out, re.M)
    history = out.split("History:\n", 1)[1]
    assert f"<busy@verrotech.com>  deferred via {REMOTE}: 451 4.2.1 mailbox busy" in history
    assert "2026-03-01 12:05:00 UTC" in history


def test_show_human_states(filled: Queue, cfg: Path) -> None:
    active = run("queue", "show", "01ACT", "-c", str(cfg)).stdout
    assert re.search(r"^Next attempt: +now \(a delivery attempt is running\)$", active, re.M)
    assert "(no delivery attempts yet)" in active
    assert "Sender:       <>" in run("queue", "show", "01NUL", "-c", str(cfg)).stdout
    run("queue", "hold", "01NUL", "-c", str(cfg))
    held = run("queue", "show", "01NUL", "-c", str(cfg)).stdout
    assert re.search(r"^State: +hold$", held, re.M)
    assert "on hold" in held


def test_show_json_is_the_list_shape_plus_history(filled: Queue, cfg: Path) -> None:
    result = run("queue", "show", "01DEF", "--json", "-c", str(cfg))
    assert result.exit_code == 0, result.stderr
    obj = json.loads(result.stdout)
    check_message_shape(
        obj, extra=frozenset({"destination", "client_address", "spf", "history"}),
        recipient_extra=frozenset({"uncertain", "notify", "orcpt"}))
    assert obj["spf"] is None  # stored without an SPF result
    assert [r.pop("uncertain") for r in obj["recipients"]] == [False, False]
    assert [(r.pop("notify"), r.pop("orcpt")) for r in obj["recipients"]] == [(None, None)] * 2
    [listed] = [m for m in listing(cfg) if m["id"] == "01DEF"]
    assert {k: obj[k] for k in LIST_KEYS} == listed
    assert obj["destination"] == "verrotech.com"
    assert obj["history"] == [
        {"at": "2026-03-01T12:05:00Z", "recipient": "busy@verrotech.com", "outcome": "deferred",
         "reply": "451 4.2.1 mailbox busy", "remote_host": REMOTE},
        {"at": "2026-03-01T12:05:00Z", "recipient": "ok@verrotech.com", "outcome": "delivered",
         "reply": "250 2.0.0 ok", "remote_host": REMOTE},
    ]


def test_show_raw_is_byte_exact(filled: Queue, cfg: Path) -> None:
    for qid in ("01SPLIT", "01SPLIT.2"):  # one stored body, two queue entries
        result = run("queue", "show", qid, "--raw", "-c", str(cfg))
        assert result.exit_code == 0, result.stderr
        assert result.stdout_bytes == RAW


def test_show_unknown_id(filled: Queue, cfg: Path) -> None:
    for flags in ([], ["--json"], ["--raw"]):
        result = run("queue", "show", "NOPE", *flags, "-c", str(cfg))
        assert one_error_line(result) == "relay: unknown queue ID NOPE"
        assert result.stdout == ""


def test_show_of_a_message_that_left_prints_its_log_but_fails(filled: Queue, cfg: Path) -> None:
    assert run("queue", "bounce", "01SPLIT", "-c", str(cfg)).exit_code == 0
    result = run("queue", "show", "01SPLIT", "-c", str(cfg))
    assert one_error_line(result) == "relay: unknown queue ID 01SPLIT"
    assert "no longer queued" in result.stdout
    assert "<a@verrotech.com>  bounced: 550 5.0.0 message returned by the postmaster" in (
        result.stdout)


def test_show_usage_errors(filled: Queue, cfg: Path) -> None:
    assert run("queue", "show", "-c", str(cfg)).exit_code == 2
    result = run("queue", "show", "01DEF", "--json", "--raw", "-c", str(cfg))
    assert result.exit_code == 2
    assert result.stdout == ""


# -- stats -------------------------------------------------------------------------


def test_stats_json(filled: Queue, cfg: Path) -> None:
    result = run("queue", "stats", "--json", "-c", str(cfg))
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert set(stats) == STATS_KEYS
    assert stats == {
        "total": 5,
        "by_state": {"active": 1, "deferred": 4, "hold": 0},
        "by_domain": {"verrotech.com": 3, "other.example": 2},
        "oldest_age_seconds": 7200,
    }


def test_stats_human(filled: Queue, cfg: Path) -> None:
    out = run("queue", "stats", "-c", str(cfg)).stdout
    assert re.search(r"^messages: 5$", out, re.M)
    assert re.search(r"^  active: +1$", out, re.M)
    assert re.search(r"^  hold: +0$", out, re.M)
    assert re.search(r"^  verrotech\.com: +3$", out, re.M)
    assert re.search(r"^oldest: 2026-03-01 12:00:00 UTC \(2h ago\)$", out, re.M)


def test_stats_of_an_empty_queue(queue: Queue, cfg: Path) -> None:
    stats = json.loads(run("queue", "stats", "--json", "-c", str(cfg)).stdout)
    assert stats == {"total": 0, "by_state": {"active": 0, "deferred": 0, "hold": 0},
                     "by_domain": {}, "oldest_age_seconds": 0}
    assert "oldest: -" in run("queue", "stats", "-c", str(cfg)).stdout


# -- flush -------------------------------------------------------------------------


def test_flush_ids_makes_them_due_now(filled: Queue, cfg: Path) -> None:
    result = run("queue", "flush", "01DEF", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "1 message flushed\n")
    view = filled.show("01DEF")
    assert view is not None and view.next_attempt_at == NOW
    again = run("queue", "flush", "01DEF", "-c", str(cfg))
    assert again.exit_code == 0  # idempotent
    active = run("queue", "flush", "01ACT", "-c", str(cfg))  # running: nothing to flush
    assert (active.exit_code, active.stdout) == (0, "0 messages flushed\n")


def park(queue: Queue, qid: str, destination: str) -> None:
    """One failed probe: the destination is down and its messages wait on it."""
    [claimed] = queue.claim_ids([qid], "n", T0 + timedelta(minutes=30), lease=600)
    queue.record(Attempt(
        message_id=qid, owner="n", lease_until=claimed.lease_until, at=T0 + timedelta(minutes=30),
        recipients=tuple(
            RecipientUpdate(r.id, r.address, RecipientStatus.DEFERRED, "421 4.4.2 down",
                            Outcome.DEFERRED)
            for r in claimed.recipients
        ),
        next_attempt_at=None, last_error="connection refused",
        destination=DestinationUpdate(destination, AttemptOutcome.SITE_FAILURE,
                                      retry_at=NOW + timedelta(hours=1), error="refused"),
    ))


def test_flush_domain_marks_it_up_and_makes_its_mail_due(filled: Queue, cfg: Path) -> None:
    park(filled, "01SPLIT.2", "other.example")
    assert "other.example" in filled.down_destinations()
    result = run("queue", "flush", "--domain", "other.example", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "2 messages flushed\n")
    assert "other.example" not in filled.down_destinations()
    for qid in ("01NUL", "01SPLIT.2"):
        view = filled.show(qid)
        assert view is not None and view.next_attempt_at == NOW


def test_flush_all(filled: Queue, cfg: Path) -> None:
    park(filled, "01SPLIT.2", "other.example")
    result = run("queue", "flush", "--all", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "4 messages flushed\n")
    assert filled.down_destinations() == {}


def test_flush_usage_errors(filled: Queue, cfg: Path) -> None:
    for args in ([], ["--all", "01DEF"], ["--all", "--domain", "verrotech.com"]):
        result = run("queue", "flush", *args, "-c", str(cfg))
        assert result.exit_code == 2, args
        assert "Traceback" not in result.stderr


# -- hold / release ------------------------------------------------------------------


def test_hold_and_release_are_idempotent(filled: Queue, cfg: Path) -> None:
    result = run("queue", "hold", "01DEF", "01NUL", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "2 messages held\n")
    assert state_of(filled, "01DEF") == "hold"
    [held] = [m for m in listing(cfg) if m["id"] == "01DEF"]
    assert held["next_attempt_at"] is None
    again = run("queue", "hold", "01DEF", "-c", str(cfg))
    assert (again.exit_code, again.stdout) == (0, "0 messages held\n")
    result = run("queue", "release", "01DEF", "01NUL", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "2 messages released\n")
    view = filled.show("01DEF")
    assert view is not None and (view.state, view.next_attempt_at) == ("deferred", NOW)
    again = run("queue", "release", "01DEF", "-c", str(cfg))
    assert (again.exit_code, again.stdout) == (0, "0 messages released\n")


def test_hold_and_release_by_domain_and_all(filled: Queue, cfg: Path) -> None:
    result = run("queue", "hold", "--domain", "other.example", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "2 messages held\n")
    assert [m["id"] for m in listing(cfg, "--state", "hold")] == ["01NUL", "01SPLIT.2"]
    assert run("queue", "release", "--domain", "OTHER.example", "-c", str(cfg)).stdout == (
        "2 messages released\n")
    assert run("queue", "hold", "--all", "-c", str(cfg)).stdout == "5 messages held\n"
    assert run("queue", "release", "--all", "-c", str(cfg)).stdout == "5 messages released\n"


def test_holding_an_active_message_keeps_it_held_after_its_attempt(
    filled: Queue, cfg: Path
) -> None:
    assert run("queue", "hold", "01ACT", "-c", str(cfg)).stdout == "1 message held\n"
    assert state_of(filled, "01ACT") == "hold"


def test_unknown_ids_are_reported_and_known_ones_still_acted_on(filled: Queue, cfg: Path) -> None:
    result = run("queue", "hold", "01DEF", "NOPE", "-c", str(cfg))
    assert one_error_line(result) == "relay: unknown queue ID NOPE"
    assert result.stdout == "1 message held\n"
    assert [line.split(" user=")[0] for line in mail_log(result)] == ["01DEF: held by operator"]
    assert state_of(filled, "01DEF") == "hold"
    for verb in ("release", "flush"):
        assert one_error_line(run("queue", verb, "NOPE", "-c", str(cfg))) == (
            "relay: unknown queue ID NOPE")


def test_verbs_refuse_no_target_and_bad_domains(filled: Queue, cfg: Path) -> None:
    for verb in ("flush", "hold", "release", "delete"):
        extra = ["--yes"] if verb == "delete" else []
        result = run("queue", verb, *extra, "-c", str(cfg))
        assert result.exit_code == 2, verb
        assert "Traceback" not in result.stderr
        for bad in ("-bad-.example", "a..b", "no/slash.example"):
            line = one_error_line(run("queue", verb, "--domain", bad, *extra, "-c", str(cfg)))
            assert line.startswith(f"relay: bad domain {bad!r}: not a domain name"), line
    assert len(listing(cfg)) == 5


# -- delete ------------------------------------------------------------------------


def test_delete_with_yes(filled: Queue, cfg: Path) -> None:
    result = run("queue", "delete", "01DEF", "--yes", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "1 message deleted\n")
    assert filled.show("01DEF") is None
    result = run("queue", "delete", "01DEF", "--yes", "-c", str(cfg))
    assert one_error_line(result) == "relay: unknown queue ID 01DEF"
    result = run("queue", "delete", "--domain", "other.example", "-y", "-c", str(cfg))
    assert result.stdout == "2 messages deleted\n"
    assert [m["id"] for m in listing(cfg)] == ["01ACT", "01SPLIT"]
    assert run("queue", "delete", "--all", "--yes", "-c", str(cfg)).stdout == (
        "2 messages deleted\n")
    assert listing(cfg) == []


def test_delete_without_a_terminal_and_without_yes_refuses(filled: Queue, cfg: Path) -> None:
    result = run("queue", "delete", "01DEF", "-c", str(cfg))
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    assert filled.show("01DEF") is not None


def test_delete_on_a_terminal_asks(
    filled: Queue, cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_verbs, "interactive", lambda: True)
    result = run("queue", "delete", "--domain", "other.example", "01DEF", "-c", str(cfg),
                 input="n\n")
    assert result.exit_code == 1
    assert "Delete 3 messages for good?" in result.stderr
    assert "relay: nothing deleted" in result.stderr
    assert filled.show("01DEF") is not None
    result = run("queue", "delete", "--domain", "other.example", "01DEF", "-c", str(cfg),
                 input="y\n")
    assert (result.exit_code, result.stdout) == (0, "3 messages deleted\n")
    assert [m["id"] for m in listing(cfg)] == ["01ACT", "01SPLIT"]
    result = run("queue", "delete", "--all", "-c", str(cfg), input="y\n")
    assert "Delete the whole queue for good?" in result.stderr
    assert result.stdout == "2 messages deleted\n"
    nothing = run("queue", "delete", "--domain", "verrotech.com", "-c", str(cfg))
    assert (nothing.exit_code, nothing.stdout) == (  # no question
        0, "no queued message for domain verrotech.com"
        " (verrotech.com is not a hosted domain)\n")


# -- bounce ------------------------------------------------------------------------


def test_bounce_queues_a_dsn_to_the_sender_and_drops_the_message(
    filled: Queue, cfg: Path
) -> None:
    result = run("queue", "bounce", "01SPLIT", "-c", str(cfg))
    assert result.exit_code == 0, result.stderr
    match = re.fullmatch(r"01SPLIT: returned to <s@sender\.example> \(DSN queued as (\S+)\)\n",
                         result.stdout)
    assert match
    dsn_id = match[1]
    assert filled.show("01SPLIT") is None
    assert filled.show("01SPLIT.2") is not None  # the other destination is untouched
    dsn = filled.show(dsn_id)
    assert dsn is not None
    assert dsn.sender == ""
    assert [r.address for r in dsn.recipients] == ["s@sender.example"]
    assert dsn.state == "deferred" and dsn.next_attempt_at == NOW
    data = filled.raw(dsn_id)
    assert data is not None
    assert b"multipart/report" in data and b"report-type=delivery-status" in data
    assert b"a@verrotech.com" in data
    [(_, rcpt, outcome, reply, _)] = filled.history("01SPLIT")
    assert (rcpt, outcome) == ("a@verrotech.com", "bounced")
    assert reply.startswith("550 5.0.0")


def test_bounce_of_held_and_deferred_messages(filled: Queue, cfg: Path) -> None:
    run("queue", "hold", "01DEF", "-c", str(cfg))
    result = run("queue", "bounce", "01DEF", "-c", str(cfg))
    assert result.exit_code == 0, result.stderr
    assert filled.show("01DEF") is None
    dsns = [m for m in listing(cfg) if m["sender"] == "" and m["id"] != "01NUL"]
    assert [d["recipients"][0]["address"] for d in dsns] == ["s@sender.example"]
    outcomes = [(h[1], h[2]) for h in filled.history("01DEF")]
    assert outcomes[-1] == ("busy@verrotech.com", "bounced")  # only the pending one


def test_bounce_of_a_null_sender_message_sends_nothing(filled: Queue, cfg: Path) -> None:
    before = {m["id"] for m in listing(cfg)}
    result = run("queue", "bounce", "01NUL", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "01NUL: removed; null sender, so no DSN\n")
    assert {m["id"] for m in listing(cfg)} == before - {"01NUL"}


def test_bounce_refuses_active_and_unknown_messages(filled: Queue, cfg: Path) -> None:
    result = run("queue", "bounce", "01ACT", "-c", str(cfg))
    line = one_error_line(result)
    assert "01ACT is being delivered" in line
    assert state_of(filled, "01ACT") == "active"
    result = run("queue", "bounce", "NOPE", "01NUL", "-c", str(cfg))
    assert one_error_line(result) == "relay: unknown queue ID NOPE"
    assert "01NUL: removed" in result.stdout
    assert [line.split(" user=")[0] for line in mail_log(result)] == [
        "01NUL: bounced by operator"]
    assert filled.show("01NUL") is None


def test_bounce_needs_ids(filled: Queue, cfg: Path) -> None:
    assert run("queue", "bounce", "-c", str(cfg)).exit_code == 2


def test_bounce_gives_back_a_message_it_cannot_bounce(
    filled: Queue, cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise ValueError("cannot build a DSN\nsecond line")

    monkeypatch.setattr(outcomes, "decide", broken)
    result = run("queue", "bounce", "01DEF", "-c", str(cfg))
    assert one_error_line(result) == "relay: 01DEF: not bounced: cannot build a DSN"
    view = filled.show("01DEF")
    assert view is not None and (view.state, view.next_attempt_at) == ("deferred", NOW)


# -- the database ----------------------------------------------------------------------


ALL_COMMANDS = (["list"], ["list", "--json"], ["show", "X"], ["show", "X", "--raw"], ["stats"],
                ["stats", "--json"], ["flush", "--all"], ["hold", "X"], ["release", "X"],
                ["delete", "X", "--yes"], ["bounce", "X"])


def test_database_not_initialised(tmp_path: Path) -> None:
    empty_dir = write_config(tmp_path / "a.toml", f"sqlite:///{tmp_path}/new/queue.db")
    (tmp_path / "empty.db").write_bytes(b"")
    empty_file = write_config(tmp_path / "b.toml", f"sqlite:///{tmp_path}/empty.db")
    for config in (empty_dir, empty_file):
        for args in ALL_COMMANDS:
            result = run("queue", *args, "-c", str(config))
            assert one_error_line(result).startswith(
                "relay: database not initialised: run relay db upgrade (queue: /"), args
    assert not (tmp_path / "new" / "queue.db").exists()  # nothing created by looking


def test_database_unreachable_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "garbage.db").write_bytes(b"this is not sqlite" * 100)
    under_a_file = write_config(tmp_path / "a.toml", f"sqlite:///{tmp_path}/a-file/sub/queue.db")
    refused = run("queue", "stats", "-c", str(under_a_file))  # a config that can never work
    assert refused.exit_code == 1 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"{under_a_file}: queue.url: cannot create {tmp_path}/a-file/sub/queue.db: "
        f"{tmp_path}/a-file is not a directory"]
    configs = [
        write_config(tmp_path / "b.toml", f"sqlite:///{tmp_path}/garbage.db"),
        write_config(tmp_path / "c.toml", "postgresql+psycopg://relay:pw@127.0.0.1:1/relay"),
    ]
    for config in configs:
        for args in (["list"], ["stats", "--json"], ["hold", "X"]):
            result = run("queue", *args, "-c", str(config))
            one_error_line(result)
            assert result.stdout == ""


def test_database_at_an_old_revision(cfg: Path, queue: Queue) -> None:
    with queue.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffffffff'")
    line = one_error_line(run("queue", "list", "-c", str(cfg)))
    assert "revision ffffffff" in line and "relay db upgrade" in line


def test_sql_errors_during_a_command_are_one_line(filled: Queue, cfg: Path) -> None:
    with filled.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE delivery_log")
    line = one_error_line(run("queue", "show", "01DEF", "-c", str(cfg)))
    assert line.startswith("relay: database error: ")


# -- helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("verrotech.com", "verrotech.com"),
        ("VerroTech.COM.", "verrotech.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("localhost", "localhost"),
        ("", None),
        ("a..b", None),
        ("-a.example", None),
        ("a-.example", None),
        ("a b.example", None),
        ("a/b.example", None),
        ("x" * 64 + ".example", None),
        ("@verrotech.com", None),
    ],
)
def test_valid_domain(name: str, expected: str | None) -> None:
    assert valid_domain(name) == expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (61, "1m 1s"), (3600, "1h"), (7201, "2h"), (7260, "2h 1m"),
     (90061, "1d 1h"), (-5, "0s")],
)
def test_span(seconds: float, text: str) -> None:
    assert queue_views.span(seconds) == text


def test_help_lists_every_command() -> None:
    out = run("queue", "--help").stdout
    for verb in ("list", "show", "stats", "flush", "hold", "release", "requeue", "delete",
                 "bounce"):
        assert re.search(rf"^  {verb}\b", out, re.M), verb


# -- the installed console script ----------------------------------------------------


def relay_command() -> list[str]:
    script = Path(sys.executable).with_name("relay")
    return [str(script)] if script.exists() else [sys.executable, "-m", "relay"]


@pytest.mark.slow
def test_console_script_raw_and_json(filled: Queue, cfg: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RELAY_CONFIG", "RELAY_QUEUE_URL")}
    env["RELAY_CONFIG"] = str(cfg)
    raw = subprocess.run([*relay_command(), "queue", "show", "01SPLIT", "--raw"],
                         capture_output=True, env=env, cwd=tmp_path, timeout=30, check=False)
    assert (raw.returncode, raw.stdout, raw.stderr) == (0, RAW, b"")
    listed = subprocess.run([sys.executable, "-m", "relay", "queue", "list", "--json"],
                            capture_output=True, env=env, cwd=tmp_path, timeout=30, check=False)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 5
    unknown = subprocess.run([*relay_command(), "queue", "show", "NOPE"],
                             capture_output=True, env=env, cwd=tmp_path, timeout=30, check=False)
    assert (unknown.returncode, unknown.stderr) == (1, b"relay: unknown queue ID NOPE\n")
    refused = subprocess.run([*relay_command(), "queue", "delete", "01DEF"],
                             stdin=subprocess.DEVNULL, capture_output=True, env=env,
                             cwd=tmp_path, timeout=30, check=False)
    assert refused.returncode == 2
    assert b"Traceback" not in refused.stderr


# -- queue IDs in any case, wake-ups --------------------------------------------------

ULID_ID = "01J9ZQ3V7K8M2N4P6R8T0W2Y4A"


@pytest.mark.parametrize("verb", ["show", "flush", "hold", "release", "delete", "bounce"])
def test_queue_ids_are_matched_whatever_their_case(queue: Queue, cfg: Path, verb: str) -> None:
    queue.put_many([msg(ULID_ID)])
    if verb == "release":
        queue.hold(Selector(ids=(ULID_ID,)))
    extra = ("--yes",) if verb == "delete" else ()
    result = run("queue", verb, ULID_ID.lower(), *extra, "-c", str(cfg))
    assert result.exit_code == 0, result.stderr
    assert "unknown queue ID" not in result.stderr
    if verb == "show":
        assert f"Queue ID:     {ULID_ID}" in result.stdout
    elif verb in ("flush", "hold", "release", "delete"):
        assert result.stdout.startswith("1 message ")
    else:
        assert queue.show(ULID_ID) is None


def test_an_id_that_is_not_a_ulid_keeps_its_case(filled: Queue, cfg: Path) -> None:
    assert one_error_line(run("queue", "show", "01def", "-c", str(cfg))) == (
        "relay: unknown queue ID 01def")


async def test_flush_and_release_wake_a_relay_listening_on_the_queue(
    filled: Queue, cfg: Path
) -> None:
    woken = asyncio.Event()
    ear = notify.listener(filled.engine, woken.set)
    ear.start(asyncio.get_running_loop())
    try:
        assert run("queue", "hold", "01DEF", "-c", str(cfg)).exit_code == 0
        assert run("queue", "release", "01DEF", "-c", str(cfg)).exit_code == 0
        await asyncio.wait_for(woken.wait(), 10)
        woken.clear()
        assert run("queue", "flush", "--all", "-c", str(cfg)).exit_code == 0
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        ear.close()
