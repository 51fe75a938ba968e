"""End to end: operating a running relay (SPEC "Package and commands", "Metrics", ETRN).

Every test runs `relay serve` as a subprocess in the reference deployment
(tests/support/deployment.py) and drives it the way an operator does: the
`relay queue ...` commands on the same database, `/metrics` and `/healthz`
over HTTP, ETRN over SMTP, and the mail log on the relay's stderr.

"The primary is down" means nothing listens on 127.0.0.2. Tests that must
show *what* made the relay deliver (a flush, an ETRN) use a 10 minute
backoff, so after the first failed attempt the relay would not try again on
its own during the test. Synchronisation is by events only: relay log lines
(`RelayProcess.wait_for`) and sink deliveries (`Sink.wait_for_messages`).
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.deployment import PRIMARY, RELAY, SENDER_MX, Deployment, message, strip_received
from tests.support.relay_process import RelayProcess, free_port
from tests.support.smtp_sink import ReceivedMessage

pytestmark = pytest.mark.slow

SENDER = "s@sender.example"
ALICE, BOB, CAROL = "alice@verrotech.com", "bob@verrotech.com", "carol@verrotech.com"
DOWN = r"destination verrotech\.com is down"
# No retry of a down destination by itself while a test runs: only an operator's
# flush, a release or an ETRN makes its mail due.
PATIENT = {"delivery": {"min_backoff": "10m", "max_backoff": "1h"}}
QUICK = 10.0  # SPEC: a running serve starts on flushed mail within 1 s

ISO_UTC = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$"
RECIPIENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["address", "status", "attempts", "last_reply"],
    "properties": {
        "address": {"type": "string", "minLength": 1},
        "status": {"enum": ["queued", "delivered", "deferred", "bounced"]},
        "attempts": {"type": "integer", "minimum": 0},
        "last_reply": {"type": ["string", "null"]},
    },
}
MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "state", "sender", "size", "received_at", "next_attempt_at",
                 "attempts", "last_error", "recipients"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "state": {"enum": ["active", "deferred", "hold"]},
        "sender": {"type": "string"},
        "size": {"type": "integer", "minimum": 0},
        "received_at": {"type": "string", "pattern": ISO_UTC},
        "next_attempt_at": {"anyOf": [{"type": "null"},
                                      {"type": "string", "pattern": ISO_UTC}]},
        "attempts": {"type": "integer", "minimum": 0},
        "last_error": {"type": ["string", "null"]},
        "recipients": {"type": "array", "minItems": 1, "items": RECIPIENT_SCHEMA},
    },
}
LIST_SCHEMA: dict[str, Any] = {"type": "array", "items": MESSAGE_SCHEMA}
COUNTS: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "integer",
                                                                     "minimum": 0}}
STATS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["total", "by_state", "by_domain", "oldest_age_seconds"],
    "properties": {
        "total": {"type": "integer", "minimum": 0},
        "by_state": {**COUNTS, "required": ["active", "deferred", "hold"]},
        "by_domain": COUNTS,
        "oldest_age_seconds": {"type": "number", "minimum": 0},
    },
}


# -- helpers -------------------------------------------------------------------


def cli_bytes(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`relay -c CONFIG ARGS...` with stdout as bytes (for `queue show --raw`)."""
    return subprocess.run(
        [sys.executable, "-m", "relay", "-c", str(relay.config), *args],
        capture_output=True, env=relay.env, timeout=60, check=False,
    )


def ok(relay: RelayProcess, *args: str) -> str:
    """Run a CLI command that must succeed; its stdout."""
    result = relay.cli(*args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def fails_with_one_line(relay: RelayProcess, *args: str) -> str:
    """Run a CLI command that must exit 1 with exactly one stderr line; that line."""
    result = relay.cli(*args)
    assert result.returncode == 1, (args, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, (args, result.stderr)
    return lines[0]


def queue_ids(relay: RelayProcess) -> dict[str, str]:
    """{queue ID: state} of what is queued now, from `queue list --json`."""
    return {m["id"]: m["state"] for m in relay.queue_list()}


def smtp_session(deployment: Deployment, helo: str = "client.sender.example") -> smtplib.SMTP:
    client = smtplib.SMTP(RELAY, deployment.relay_port, timeout=10)
    code, _ = client.ehlo(helo)
    assert code == 250
    return client


def relay_denied(deployment: Deployment) -> None:
    """One RCPT for a domain we do not host: 554, nothing queued."""
    with smtp_session(deployment) as client:
        client.mail(SENDER)
        code, reply = client.rcpt("mallory@elsewhere.example")
        assert code == 554, reply
        assert b"Relay access denied" in reply


def sent_bodies(messages: list[ReceivedMessage]) -> list[bytes]:
    return sorted(strip_received(m.data) for m in messages)


def dsn_status_lines(dsn: ReceivedMessage) -> list[str]:
    """The `Status:` fields of a DSN's delivery-status part."""
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.compat32)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    status = [part for part in parsed.walk()
              if part.get_content_type() == "message/delivery-status"]
    assert len(status) == 1
    text = status[0].as_string()
    return re.findall(r"^Status:\s*(\S+)", text, re.MULTILINE | re.IGNORECASE)


# -- 1. queue verbs against a running relay ------------------------------------


@pytest.mark.parametrize("deployment_config", [PATIENT], indirect=True)
def test_queue_verbs_on_a_running_relay(deployment: Deployment) -> None:
    sender_mx = deployment.sink(SENDER_MX)
    relay = deployment.relay().start()
    first = deployment.send(SENDER, [ALICE], message(0))
    relay.wait_for(DOWN)  # first failed attempt: the rest of the mail is parked
    held, deleted, bounced, flushed = (
        deployment.send(SENDER, [ALICE], message(n)) for n in range(1, 5))
    ids = {first, held, deleted, bounced, flushed}
    body = {first: 0, held: 1, deleted: 2, bounced: 3, flushed: 4}

    # list: the mailq table and JSON
    table = ok(relay, "queue", "list")
    assert table.splitlines()[0].startswith("-Queue ID-")
    for qid in ids:
        assert re.search(rf"^{qid}\s+\d+ ", table, re.MULTILINE), table
    assert table.rstrip().endswith("in 5 Requests.")
    listed = json.loads(ok(relay, "queue", "list", "--json"))
    jsonschema.validate(listed, LIST_SCHEMA)
    assert {m["id"] for m in listed} == ids
    for m in listed:
        assert m["state"] == "deferred"
        assert m["sender"] == SENDER
        assert m["size"] > len(message(body[m["id"]]))  # with our Received header
        assert [r["address"] for r in m["recipients"]] == [ALICE]
    [tried] = [m for m in listed if m["id"] == first]
    assert tried["attempts"] == 1 and tried["recipients"][0]["status"] == "deferred"
    assert tried["last_error"]
    assert all(m["attempts"] == 0 and m["recipients"][0]["status"] == "queued"
               for m in listed if m["id"] != first)
    assert json.loads(ok(relay, "queue", "list", "--json", "--domain", "verrotech.com")) \
        == listed
    assert json.loads(ok(relay, "queue", "list", "--json", "--state", "hold")) == []

    # show: text, JSON, raw bytes
    text = ok(relay, "queue", "show", first)
    assert f"Queue ID:     {first}" in text and "State:        deferred" in text
    assert f"<{ALICE}>" in text and f"<{SENDER}>" in text
    shown = json.loads(ok(relay, "queue", "show", first, "--json"))
    jsonschema.validate(shown, MESSAGE_SCHEMA)
    assert shown["id"] == first and shown["destination"] == "verrotech.com"
    assert shown["client_address"] == "127.0.0.1"
    assert shown["spf"] == "none"  # sender.example publishes no SPF record
    # show's recipients carry more keys than list's (SPEC Part 2: "uncertain")
    assert [r.pop("uncertain") for r in shown["recipients"]] == [False]
    assert [(r.pop("notify"), r.pop("orcpt")) for r in shown["recipients"]] == [(None, None)]
    assert {k: shown[k] for k in tried} == tried
    raw = cli_bytes(relay, "queue", "show", held, "--raw")
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout.startswith(
        b"Authentication-Results: mail.verrotech.net; spf=none smtp.mailfrom=sender.example\r\n"
        b"Received: from client.sender.example")
    assert strip_received(raw.stdout) == message(1)  # byte for byte, dot line included
    received = raw.stdout[: len(raw.stdout) - len(message(1))]
    assert b"by mail.verrotech.net" in received and held.encode() in received
    assert len(raw.stdout) == next(m["size"] for m in listed if m["id"] == held)

    # stats
    stats = json.loads(ok(relay, "queue", "stats", "--json"))
    jsonschema.validate(stats, STATS_SCHEMA)
    assert stats["total"] == 5
    assert stats["by_state"]["deferred"] == 5 and stats["by_state"]["hold"] == 0
    assert stats["by_domain"] == {"verrotech.com": 5}

    # hold (twice: idempotent), delete, bounce; unknown IDs
    assert ok(relay, "queue", "hold", held).strip() == "1 message held"
    assert ok(relay, "queue", "hold", held).strip() == "0 messages held"
    assert queue_ids(relay)[held] == "hold"
    [on_hold] = json.loads(ok(relay, "queue", "list", "--json", "--state", "hold"))
    assert on_hold["id"] == held and on_hold["next_attempt_at"] is None
    assert re.search(rf"^{held}!", ok(relay, "queue", "list"), re.MULTILINE)
    assert ok(relay, "queue", "delete", deleted, "--yes").strip() == "1 message deleted"
    bounce_out = ok(relay, "queue", "bounce", bounced)
    assert f"{bounced}: returned to <{SENDER}>" in bounce_out
    [dsn] = sender_mx.wait_for_messages(1, timeout=QUICK)
    assert dsn.sender == "" and dsn.recipients == (SENDER,)
    assert b"Subject: message 3\r\n" in dsn.data  # the returned headers are attached
    assert [s[0] for s in dsn_status_lines(dsn)] == ["5"]
    relay.wait_for(r": delivered .*to=<s@sender\.example>")  # the DSN left the queue too
    assert set(queue_ids(relay)) == {first, held, flushed}
    stats = json.loads(ok(relay, "queue", "stats", "--json"))
    assert stats["total"] == 3 and stats["by_state"]["hold"] == 1

    unknown = "01NOSUCHMESSAGE0000000000"
    for verb in (("show", unknown, "--json"), ("show", unknown, "--raw"), ("hold", unknown),
                 ("release", unknown), ("delete", unknown, "--yes"), ("bounce", unknown)):
        line = fails_with_one_line(relay, "queue", *verb)
        assert unknown in line, (verb, line)

    # the primary comes back; nothing is due until the operator flushes
    primary = deployment.sink(PRIMARY)
    assert primary.session_count == 0
    assert ok(relay, "queue", "flush", "--domain", "verrotech.com").strip() \
        == "2 messages flushed"
    got = primary.wait_for_messages(2, timeout=QUICK)
    assert sent_bodies(got) == sorted([message(0), message(4)])
    relay.wait_for(rf"{flushed}: delivered ")
    relay.wait_for(rf"{first}: delivered ")
    assert queue_ids(relay) == {held: "hold"}  # held mail stays, even with the primary up
    assert relay.count(rf"{held}: attempt ") == 0

    # release: delivered at once
    assert ok(relay, "queue", "release", held).strip() == "1 message released"
    got = primary.wait_for_messages(3, timeout=QUICK)
    relay.wait_for(rf"{held}: delivered ")
    assert sent_bodies(got) == sorted([message(0), message(1), message(4)])
    assert relay.queue_list() == []
    assert relay.count(rf"{deleted}: attempt ") == 0
    assert relay.count(rf"{bounced}: attempt ") == 0
    assert primary.message_count == 3 and sender_mx.message_count == 1
    assert relay.terminate() == 0


# -- 2. metrics ----------------------------------------------------------------


class Scraper:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            with error:
                return int(error.code), error.read().decode()

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """One sample; a missing labelled series counts as absent (AssertionError)."""
        samples = self.samples()
        key = (name, frozenset(labels.items()))
        assert key in samples, f"{name}{labels} not exported: {sorted(samples)}"
        return samples[key]


@pytest.fixture
def metrics_port() -> int:
    return free_port("127.0.0.1")


def test_metrics_follow_accept_outage_and_recovery(deployment: Deployment,
                                                   metrics_port: int) -> None:
    deployment.write_config(PATIENT, metrics={"listen": f"127.0.0.1:{metrics_port}"})
    relay = deployment.relay().start()
    scrape = Scraper(metrics_port)
    assert scrape.get("/healthz")[0] == 200
    assert scrape.value("relay_smtp_messages_accepted_total") == 0
    assert scrape.value("relay_delivery_attempts_total", result="delivered") == 0

    relay_denied(deployment)
    assert scrape.value("relay_smtp_rejections_total", reason="relay_denied") == 1

    first = deployment.send(SENDER, [ALICE], message(0))
    relay.wait_for(DOWN)
    assert scrape.value("relay_smtp_messages_accepted_total") == 1
    deployment.send(SENDER, [ALICE], message(1))
    samples = scrape.samples()
    assert samples[("relay_smtp_messages_accepted_total", frozenset())] == 2
    assert samples[("relay_queue_messages", frozenset({("state", "deferred")}))] == 2
    assert samples[("relay_queue_messages", frozenset({("state", "active")}))] == 0
    assert samples[("relay_queue_messages", frozenset({("state", "hold")}))] == 0
    assert samples[("relay_delivery_attempts_total", frozenset({("result", "deferred")}))] == 1
    assert samples[("relay_destination_up", frozenset({("destination", "verrotech.com")}))] == 0
    assert samples[("relay_queue_oldest_message_age_seconds", frozenset())] >= 0

    primary = deployment.sink(PRIMARY)
    ok(relay, "queue", "flush", "--domain", "verrotech.com")
    primary.wait_for_messages(2, timeout=QUICK)
    relay.wait_for(r": delivered .*to=<alice@verrotech\.com>", count=2)
    assert relay.count(rf"{first}: delivered ") == 1
    samples = scrape.samples()
    assert samples[("relay_queue_messages", frozenset({("state", "deferred")}))] == 0
    assert samples[("relay_delivery_attempts_total", frozenset({("result", "delivered")}))] == 2
    assert samples[("relay_delivery_attempts_total", frozenset({("result", "bounced")}))] == 0
    assert samples[("relay_destination_up", frozenset({("destination", "verrotech.com")}))] == 1
    assert samples[("relay_delivery_duration_seconds_count", frozenset())] >= 3
    assert samples[("relay_smtp_rejections_total", frozenset({("reason", "relay_denied")}))] == 1
    assert samples[("relay_queue_oldest_message_age_seconds", frozenset())] == 0
    status, text = scrape.get("/healthz")
    assert status == 200 and text.strip() == "ok"
    assert relay.terminate() == 0


# -- 3. ETRN -------------------------------------------------------------------


@pytest.mark.parametrize(
    "deployment_config", [{**PATIENT, "smtp": {"etrn_clients": ["127.0.0.0/8"]}}], indirect=True)
def test_etrn_from_an_allowed_client_delivers_deferred_mail(deployment: Deployment) -> None:
    relay = deployment.relay().start()
    qid = deployment.send(SENDER, [ALICE], message(0))
    relay.wait_for(DOWN)
    primary = deployment.sink(PRIMARY)
    with smtp_session(deployment) as client:
        code, reply = client.docmd("ETRN")
        assert code == 501, reply
        code, reply = client.docmd("ETRN", "elsewhere.example")
        assert code == 458, reply
        assert primary.session_count == 0  # nothing would have tried it before the ETRN
        code, reply = client.docmd("ETRN", "verrotech.com")
        assert (code, reply) == (250, b"2.0.0 Queuing for node verrotech.com started")
    [got] = primary.wait_for_messages(1, timeout=QUICK)
    assert strip_received(got.data) == message(0)
    relay.wait_for(rf"{qid}: delivered ")
    assert relay.queue_list() == []
    assert relay.terminate() == 0


@pytest.mark.parametrize(
    "deployment_config", [{**PATIENT, "smtp": {"etrn_clients": ["10.0.0.0/8"]}}], indirect=True)
def test_etrn_from_a_client_not_allowed_gets_459(deployment: Deployment) -> None:
    relay = deployment.relay().start()
    qid = deployment.send(SENDER, [ALICE], message(0))
    relay.wait_for(DOWN)
    with smtp_session(deployment) as client:
        code, reply = client.docmd("ETRN")
        assert code == 501, reply
        code, reply = client.docmd("ETRN", "verrotech.com")
        assert code == 459, reply
        assert reply.startswith(b"4.7.1 ")
        assert client.noop()[0] == 250  # the session goes on
    relay.wait_for(r"NOQUEUE: rejected .*stage=ETRN")
    assert queue_ids(relay) == {qid: "deferred"}  # not flushed
    assert relay.terminate() == 0


# -- 4. the mail log -----------------------------------------------------------

_TEXT_EVENT = re.compile(r" relay\.mail: (?P<id>\S+): (?P<event>\w+) (?P<fields>.*)$")


def mail_events(relay: RelayProcess, log_format: str) -> list[dict[str, Any]]:
    """Every mail log event of the relay's stderr as a dict (`event`, `id`, fields)."""
    events = []
    for line in relay.lines:
        if log_format == "json":
            record = json.loads(line)  # every line, not only mail events
            assert isinstance(record, dict), line
            if "event" in record:
                events.append(record)
            continue
        match = _TEXT_EVENT.search(line)
        if match is None:
            continue
        fields: dict[str, Any] = {"id": match["id"], "event": match["event"]}
        for pair in re.split(r", (?=[a-z_]+=)", match["fields"]):
            key, sep, value = pair.partition("=")
            assert sep, (pair, line)
            fields[key] = value
        events.append(fields)
    return events


def one(events: list[dict[str, Any]], **wanted: str) -> dict[str, Any]:
    found = [e for e in events if all(e.get(k) == v for k, v in wanted.items())]
    assert len(found) >= 1, (wanted, events)
    return found[0]


@pytest.mark.parametrize("deployment_config", [{}, {"log": {"format": "json"}}],
                         indirect=True, ids=["text", "json"])
def test_mail_log_tells_the_story_of_a_message(deployment: Deployment,
                                               deployment_config: Mapping[str, Any]) -> None:
    log_format = deployment_config.get("log", {}).get("format", "text")
    primary = deployment.sink(PRIMARY)
    sender_mx = deployment.sink(SENDER_MX)
    primary.rcpt_reply[BOB] = "450 4.2.1 mailbox busy"
    primary.rcpt_reply[CAROL] = "550 5.1.1 <carol@verrotech.com>: no such user"
    relay = deployment.relay().start()
    relay_denied(deployment)
    qid = deployment.send(SENDER, [ALICE, BOB, CAROL], message(1))
    sender_mx.wait_for_messages(1, timeout=20)  # the DSN: the first attempt is recorded
    del primary.rcpt_reply[BOB]
    primary.wait_for_messages(2, timeout=20)
    if log_format == "text":
        relay.wait_for(rf"{qid}: delivered .*to=<bob@verrotech\.com>")
    else:
        relay.wait_for(rf'"event": "delivered", "id": "{qid}", .*"to": "<bob@verrotech\.com>"')
    assert relay.terminate() == 0

    events = mail_events(relay, log_format)
    mine = [e for e in events if e["id"] == qid]
    assert {e["event"] for e in mine} >= {"queued", "attempt", "delivered", "deferred",
                                         "bounced", "dsn"}
    queued = one(mine, event="queued")
    assert queued["client"] == "127.0.0.1"
    assert queued["from"] == f"<{SENDER}>"
    assert queued["to"] == f"<{ALICE}>,<{BOB}>,<{CAROL}>"
    assert str(queued["nrcpt"]) == "3"
    attempt = one(mine, event="attempt")
    assert attempt["from"] == f"<{SENDER}>" and ALICE in attempt["to"]
    for event_name, rcpt, reply in (("delivered", ALICE, "250"), ("deferred", BOB, "450 4.2.1"),
                                    ("bounced", CAROL, "550 5.1.1"),
                                    ("delivered", BOB, "250")):
        line = one(mine, event=event_name, to=f"<{rcpt}>")
        assert line["from"] == f"<{SENDER}>"
        assert PRIMARY in str(line["relay"]), line
        assert str(line["reply"]).startswith(reply), line
        assert float(line["delay"]) >= 0
    dsn_event = one(mine, event="dsn")
    assert dsn_event["to"] == f"<{SENDER}>" and dsn_event["dsn_id"]
    rejected = one(events, event="rejected", id="NOQUEUE")
    assert rejected["client"] == "127.0.0.1"
    assert rejected["to"] == "<mallory@elsewhere.example>"
    assert rejected["from"] == f"<{SENDER}>"
    assert str(rejected["reply"]).startswith("554 5.7.1")
    if log_format == "text":
        assert re.search(r"NOQUEUE: rejected client=127\.0\.0\.1, ", relay.log)
        assert re.search(rf"{qid}: queued client=127\.0\.0\.1, .*from=<{SENDER}>", relay.log)
    else:
        assert all(isinstance(json.loads(line), dict) for line in relay.lines)


# -- 5. expiry -----------------------------------------------------------------


@pytest.mark.parametrize("deployment_config", [{"delivery": {"max_lifetime": "2s"}}],
                         indirect=True)
def test_expired_message_bounces_with_5_4_7(deployment: Deployment) -> None:
    sender_mx = deployment.sink(SENDER_MX)
    relay = deployment.relay().start()
    qid = deployment.send(SENDER, [ALICE], message(0))
    relay.wait_for(rf"{qid}: expired .*to=<alice@verrotech\.com>", timeout=30)
    [dsn] = sender_mx.wait_for_messages(1, timeout=20)
    assert dsn.sender == "" and dsn.recipients == (SENDER,)
    assert dsn_status_lines(dsn) == ["5.4.7"]
    relay.wait_for(rf"{qid}: dsn .*to=<s@sender\.example>")
    assert re.search(rf"{qid}: expired .*reply=550 5\.4\.7 ", relay.log)
    relay.wait_for(r": delivered .*to=<s@sender\.example>")
    assert relay.queue_list() == []
    assert relay.terminate() == 0



@pytest.mark.parametrize("deployment_config", [{"delivery": {"max_lifetime": "3s"}}],
                         indirect=True)
def test_an_expired_probe_does_not_stall_its_destination(deployment: Deployment) -> None:
    deployment.sink(SENDER_MX)
    relay = deployment.relay().start()
    probe = deployment.send(SENDER, [ALICE], message(0))
    relay.wait_for(DOWN)
    parked = deployment.send(SENDER, [ALICE], message(1))  # parked behind `probe`
    relay.wait_for(rf"{probe}: expired ", timeout=30)
    deployment.sink(PRIMARY)
    # max_backoff is 2 s: the next probe (`parked`, delivered or expired by then) is due
    # within it; without one, `parked` waits for the 60 s expiry sweep or the 1 h lease.
    relay.wait_for(rf"{parked}: (delivered|expired) ", timeout=8)
    assert relay.terminate() == 0


# -- 6. an outage as the operator sees it ------------------------------------------


def test_an_outage_in_the_mail_log_and_relay_status(deployment: Deployment) -> None:
    """One `down` line however many messages and probes fail, one `up again` line
    with the outage's length, and `relay status` showing the destination meanwhile."""
    deployment.sink(SENDER_MX)
    relay = deployment.relay().start()
    deployment.send(SENDER, [ALICE], message(0))
    relay.wait_for(DOWN)
    deployment.send(SENDER, [BOB], message(1))
    deployment.send(SENDER, [CAROL], message(2))
    relay.wait_for(r": deferred ", count=2, timeout=30)  # a probe (max_backoff 2 s) failed too
    status = json.loads(ok(relay, "status", "--json"))
    [down] = status["destinations"]
    assert (down["destination"], down["up"], down["messages"]) == ("verrotech.com", False, 3)
    assert down["since"] is not None and "Connection refused" in down["last_reply"]
    assert status["queue"]["total"] == 3
    [node] = status["nodes"]  # the running relay, from the node registry
    assert (node["hostname"], node["pid"]) == ("mail.verrotech.net", relay.proc.pid)
    assert "verrotech.com  down" in ok(relay, "status")

    primary = deployment.sink(PRIMARY)
    primary.wait_for_messages(3, timeout=30)
    relay.wait_for(r"destination verrotech\.com is up again after \d+s", timeout=10)
    relay.wait_for(r": delivered ", count=3)
    assert relay.count(DOWN) == 1
    assert relay.count(r"destination verrotech\.com is up again") == 1
    assert json.loads(ok(relay, "status", "--json"))["destinations"] == []
    assert relay.terminate() == 0
