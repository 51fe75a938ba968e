"""Mail log lines as operators grep them: deferrals name a time, operator actions
and destination transitions carry SPEC's wording, in text and in JSON."""

from __future__ import annotations

import json
import logging

import pytest

from relay.core import maillog
from relay.delivery.outcomes import decide
from tests.unit.test_outcomes import BUSY, ORIGINAL, REFUSED, T0, claimed, report, rules


@pytest.fixture(autouse=True)
def mail_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="relay.mail")


def texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "relay.mail"]


def field(line: str, key: str) -> str:
    return line.split(f"{key}=", 1)[1].split(", ")[0]


def test_a_parked_deferral_names_the_destinations_next_probe(
    caplog: pytest.LogCaptureFixture
) -> None:
    d = decide(rules(), claimed("a@verrotech.com"), "n", T0,
               report=report(site_failure=True, a=REFUSED), original=ORIGINAL)
    assert d.attempt.next_attempt_at is None and d.attempt.destination is not None
    maillog.attempt_results(claimed("a@verrotech.com"), d, T0)
    [line] = texts(caplog)
    assert line.startswith("Q1: deferred ")
    probe = d.attempt.destination.retry_at
    assert probe is not None and field(line, "next_attempt") == probe.isoformat()


def test_a_plain_deferral_names_its_own_retry_time(caplog: pytest.LogCaptureFixture) -> None:
    d = decide(rules(), claimed("a@verrotech.com"), "n", T0, report=report(a=BUSY),
               original=ORIGINAL)
    maillog.attempt_results(claimed("a@verrotech.com"), d, T0)
    [line] = texts(caplog)
    assert d.attempt.next_attempt_at is not None
    assert field(line, "next_attempt") == d.attempt.next_attempt_at.isoformat()


def test_operator_lines(caplog: pytest.LogCaptureFixture) -> None:
    for action in maillog.OPERATOR_ACTIONS:
        maillog.operator(action, ["01A", "01B"], user="alice")
    maillog.operator("held", ["01C"])
    lines = texts(caplog)
    assert lines[:2] == ["01A: held by operator user=alice", "01B: held by operator user=alice"]
    assert [line.split(": ", 1)[1].split(" user=")[0] for line in lines[::2]] == [
        f"{a} by operator" for a in maillog.OPERATOR_ACTIONS] + ["held by operator"]
    assert lines[-1] == "01C: held by operator"  # no user: no trailing field
    with pytest.raises(ValueError, match="unknown operator action"):
        maillog.operator("lost", ["01A"])


def test_destination_lines_in_text_and_json(caplog: pytest.LogCaptureFixture) -> None:
    maillog.destination_down("verrotech.com", "451 4.4.1 connect: Connection refused")
    maillog.destination_up("verrotech.com", 3725.0)
    maillog.destination_up("verrotech.com", None)
    assert texts(caplog) == [
        "destination verrotech.com is down: 451 4.4.1 connect: Connection refused",
        "destination verrotech.com is up again after 1h 2m",
        "destination verrotech.com is up again after an unknown time",
    ]
    formatter = maillog.JsonFormatter()
    as_json = [json.loads(formatter.format(r)) for r in caplog.records]
    assert {k: as_json[0][k] for k in ("event", "destination", "reason")} == {
        "event": "destination down", "destination": "verrotech.com",
        "reason": "451 4.4.1 connect: Connection refused"}
    assert (as_json[1]["event"], as_json[1]["down_seconds"]) == ("destination up", 3725)


def test_to_stderr_attaches_and_detaches_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    before = list(maillog.log.handlers)
    with maillog.to_stderr("info", json_lines=True):
        maillog.operator("deleted", ["01A"], user="bob")
    assert maillog.log.handlers == before
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (line["event"], line["id"], line["user"]) == ("deleted by operator", "01A", "bob")
    maillog.operator("deleted", ["01B"])
    assert "01B" not in capsys.readouterr().err  # the handler is gone
    assert logging.getLogger("relay.mail").level == logging.INFO  # the fixture's, restored
