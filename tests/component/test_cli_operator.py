"""The operator's day over the real CLI, on SQLite and PostgreSQL: `relay queue
requeue`, the mail log line of every operator verb (text and JSON), and what a
`--domain` that selects nothing says (SPEC Part 2 "Operating it day to day")."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from relay.cluster import notify
from relay.core.clock import FakeClock
from relay.core.destination import AttemptOutcome
from relay.core.model import Outcome, RecipientStatus
from relay.ops.cli import queue_select
from relay.ops.cli.main import command_tree, main_group
from relay.queue.access import Queue
from relay.queue.rows import Attempt, DestinationUpdate, NewMessage, RecipientUpdate, Selector
from relay.queue.schema import recipients

command_tree()  # every command group, as relay.ops.cli.main.main() builds them

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=2)
MAIL_LOG = re.compile(r"^\S+ \S+ INFO relay\.mail: (.*)$", re.M)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.delenv("RELAY_QUEUE_URL", raising=False)
    monkeypatch.setattr(queue_select, "clock", FakeClock(NOW))
    monkeypatch.setattr(queue_select, "operator_name", lambda: "alice")
    yield


def write_config(path: Path, queue: Queue, extra: str = "") -> Path:
    url = queue.engine.url.render_as_string(hide_password=False)
    path.write_text(f'[queue]\nurl = "{url}"\n\n[domains."verrotech.com"]\n{extra}')
    return path


@pytest.fixture
def cfg(tmp_path: Path, queue: Queue) -> Path:
    return write_config(tmp_path / "relay.toml", queue)


def msg(qid: str, *rcpts: str) -> NewMessage:
    return NewMessage(id=qid, sender="s@sender.example", recipients=rcpts or ("a@verrotech.com",),
                      data=b"Subject: x\r\n\r\nx\r\n", received_at=T0)


def fail_site(queue: Queue, qid: str, destination: str = "verrotech.com") -> None:
    """A failed attempt: the destination goes down, its mail is parked, attempts go up."""
    at = T0 + timedelta(minutes=30)
    [claimed] = queue.claim_ids([qid], "n", at, lease=600)
    queue.record(Attempt(
        message_id=qid, owner="n", lease_until=claimed.lease_until, at=at,
        recipients=tuple(RecipientUpdate(r.id, r.address, RecipientStatus.DEFERRED,
                                         "421 4.4.2 down", Outcome.DEFERRED)
                         for r in claimed.recipients),
        next_attempt_at=None, last_error="connection refused",
        destination=DestinationUpdate(destination, AttemptOutcome.SITE_FAILURE,
                                      retry_at=NOW + timedelta(hours=1), error="refused"),
    ))


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main_group, list(args), input=input, catch_exceptions=False)


def logged(result: Result) -> list[str]:
    return MAIL_LOG.findall(result.stderr)


# -- requeue -------------------------------------------------------------------


def test_requeue_starts_attempts_and_backoff_over_and_keeps_the_lifetime(
    queue: Queue, cfg: Path
) -> None:
    queue.put_many([msg("01A"), msg("01B"), msg("01C", "c@other.example")])
    fail_site(queue, "01A")
    fail_site(queue, "01C", "other.example")
    before = queue.show("01A")
    assert before is not None and before.attempts == 1 and before.last_error
    assert "verrotech.com" in queue.down_destinations()
    result = run("queue", "requeue", "--domain", "verrotech.com", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "2 messages requeued\n")
    assert logged(result) == ["01A: requeued by operator user=alice",
                              "01B: requeued by operator user=alice"]
    after = queue.show("01A")
    assert after is not None
    assert (after.state, after.attempts, after.last_error, after.next_attempt_at) == (
        "deferred", 0, "", NOW)
    assert after.received_at == before.received_at  # lifetime unchanged
    assert [r.attempts for r in after.recipients] == [0]
    with queue.engine.connect() as conn:
        assert conn.execute(select(recipients.c.status).where(
            recipients.c.message_id == "01A")).scalar() == "deferred"
    assert "verrotech.com" not in queue.down_destinations()  # routed afresh
    assert "other.example" in queue.down_destinations()  # not selected: untouched
    other = queue.show("01C")
    assert other is not None and other.attempts == 1


def test_requeue_keeps_held_mail_held_and_leaves_running_attempts_alone(
    queue: Queue, cfg: Path
) -> None:
    queue.put_many([msg("01H"), msg("01R")])
    queue.hold(Selector(ids=("01H",)))
    queue.claim_ids(["01R"], "node", NOW, lease=600)
    result = run("queue", "requeue", "--all", "-c", str(cfg))
    assert (result.exit_code, result.stdout) == (0, "1 message requeued\n")
    held = queue.show("01H")
    assert held is not None and held.state == "hold"
    running = queue.show("01R")
    assert running is not None and running.state == "active"
    released = run("queue", "release", "01H", "-c", str(cfg))
    assert released.stdout == "1 message released\n"


def test_requeue_by_id_reports_unknown_ids(queue: Queue, cfg: Path) -> None:
    queue.put_many([msg("01A")])
    result = run("queue", "requeue", "01A", "NOPE", "-c", str(cfg))
    assert result.exit_code == 1
    assert result.stdout == "1 message requeued\n"
    assert "relay: unknown queue ID NOPE" in result.stderr.splitlines()
    assert run("queue", "requeue", "-c", str(cfg)).exit_code == 2  # nothing selected


async def test_requeue_wakes_a_relay_listening_on_the_queue(queue: Queue, cfg: Path) -> None:
    queue.put_many([msg("01A")])
    woken = asyncio.Event()
    ear = notify.listener(queue.engine, woken.set)
    ear.start(asyncio.get_running_loop())
    try:
        ready = getattr(ear, "listening", None)  # PostgreSQL: LISTEN before the NOTIFY
        if ready is not None:
            assert await asyncio.to_thread(ready.wait, 10)
        assert run("queue", "requeue", "01A", "-c", str(cfg)).exit_code == 0
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        ear.close()


# -- the mail log of operator verbs ------------------------------------------------


def test_every_verb_logs_each_message_it_changed(queue: Queue, cfg: Path) -> None:
    queue.put_many([msg("01A"), msg("01B"), msg("01C")])
    steps = [
        (("hold", "01A", "01B"), ["01A: held", "01B: held"]),
        (("hold", "01A"), []),  # already held: nothing changed, nothing logged
        (("release", "--all"), ["01A: released", "01B: released"]),
        (("flush", "01C"), ["01C: flushed"]),
        (("requeue", "01B"), ["01B: requeued"]),
        (("delete", "--yes", "01A"), ["01A: deleted"]),
        (("bounce", "01B"), ["01B: bounced"]),
    ]
    for args, expected in steps:
        result = run("queue", *args, "-c", str(cfg))
        assert result.exit_code == 0, (args, result.stderr)
        assert logged(result) == [f"{line} by operator user=alice" for line in expected], args


def test_the_mail_log_follows_the_configured_json_format(
    queue: Queue, tmp_path: Path
) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(write_config(cfg, queue).read_text().replace(
        "[queue]", '[log]\nformat = "json"\n\n[queue]'))
    queue.put_many([msg("01A")])
    result = run("queue", "hold", "01A", "-c", str(cfg))
    assert result.exit_code == 0
    [line] = result.stderr.splitlines()
    event = json.loads(line)
    assert {k: event[k] for k in ("event", "id", "user", "logger")} == {
        "event": "held by operator", "id": "01A", "user": "alice", "logger": "relay.mail"}


def test_a_quieter_log_level_leaves_the_mail_log_out(queue: Queue, tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(write_config(cfg, queue).read_text().replace(
        "[queue]", '[log]\nlevel = "warning"\n\n[queue]'))
    queue.put_many([msg("01A")])
    result = run("queue", "hold", "01A", "-c", str(cfg))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "1 message held\n", "")


# -- a --domain that selects nothing --------------------------------------------------


@pytest.mark.parametrize("verb", ["flush", "hold", "release", "requeue", "delete"])
def test_a_domain_without_mail_says_so_and_whether_it_is_hosted(
    queue: Queue, cfg: Path, verb: str
) -> None:
    queue.put_many([msg("01A", "x@other.example")])
    extra = ("--yes",) if verb == "delete" else ()
    hosted = run("queue", verb, "--domain", "verrotech.com", *extra, "-c", str(cfg))
    assert (hosted.exit_code, hosted.stdout) == (
        0, "no queued message for domain verrotech.com\n")
    stranger = run("queue", verb, "--domain", "nowhere.example", *extra, "-c", str(cfg))
    assert (stranger.exit_code, stranger.stdout) == (
        0, "no queued message for domain nowhere.example (nowhere.example is not a hosted "
        "domain)\n")
    assert logged(hosted) == logged(stranger) == []


def test_a_domain_with_mail_that_the_verb_leaves_alone_still_counts(
    queue: Queue, cfg: Path
) -> None:
    queue.put_many([msg("01A")])
    result = run("queue", "release", "--domain", "verrotech.com", "-c", str(cfg))
    assert result.stdout == "0 messages released\n"  # queued, just not held


def test_list_of_a_domain_without_mail(queue: Queue, cfg: Path) -> None:
    text = run("queue", "list", "--domain", "nowhere.example", "-c", str(cfg))
    assert (text.exit_code, text.stdout) == (
        0, "no queued message for domain nowhere.example (nowhere.example is not a hosted "
        "domain)\n")
    as_json = run("queue", "list", "--json", "--domain", "verrotech.com", "-c", str(cfg))
    assert (as_json.exit_code, json.loads(as_json.stdout)) == (0, [])
    assert as_json.stderr == "no queued message for domain verrotech.com\n"


# -- the next-attempt column of queue list ---------------------------------------------


def test_list_shows_when_each_message_is_tried_next(
    queue: Queue, cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue.put_many([msg("01A"), msg("01B"), msg("01C", "c@other.example")])
    fail_site(queue, "01A")  # verrotech.com down, its probe in an hour
    out = run("queue", "list", "-c", str(cfg)).stdout
    assert "--Arrival Time (UTC)-- --Next Attempt (UTC)--" in out.splitlines()[0]
    for qid in ("01A", "01B"):  # parked: the destination's next probe
        assert re.search(rf"^{qid} +\d+ 2026-03-01 12:00:00 +2026-03-01 15:00:00 ", out, re.M)
    assert re.search(r"^01C +\d+ 2026-03-01 12:00:00 +due now ", out, re.M)
    later = NOW + timedelta(hours=1)
    queue.start_probes(later, stale_before=T0)  # 01A probes, 01B waits for its outcome
    monkeypatch.setattr(queue_select, "clock", FakeClock(later))
    out = run("queue", "list", "-c", str(cfg)).stdout
    assert re.search(r"^01A +\d+ \S+ \S+ +due now ", out, re.M)
    assert re.search(r"^01B +\d+ \S+ \S+ +after the probe ", out, re.M)
