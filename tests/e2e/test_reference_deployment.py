"""End to end: the relay as a subprocess in the reference deployment of SPEC.

verrotech.com has MX 10 mail.verrotech.com (the primary, a sink on 127.0.0.2),
MX 20 mail.verrotech.net (this relay, on 127.0.0.3) and MX 30
mail.noc.verrotech.com (Norwich, a sink on 127.0.0.4). Senders' domain
sender.example has its MX on 127.0.0.5. A real DNS server on 127.0.0.1
serves the zone; the relay's queue is real SQLite.
"""

from __future__ import annotations

import email
import email.policy
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest
from flufl.bounce import all_failures

from tests.support.deployment import (
    NORWICH,
    PRIMARY,
    RELAY,
    SENDER_MX,
    Deployment,
    message,
    strip_received,
)

pytestmark = pytest.mark.slow


@contextmanager
def client_inside_data(deployment: Deployment) -> Iterator[BinaryIO]:
    """A client that got 354 and sent half a message ("never finished"), then
    stopped: the stream to read what the relay says next."""
    sock = socket.create_connection((RELAY, deployment.relay_port), timeout=20)
    with sock, sock.makefile("rwb") as stream:
        stream.readline()
        for line in (b"EHLO x.example\r\n", b"MAIL FROM:<s@sender.example>\r\n",
                     b"RCPT TO:<alice@verrotech.com>\r\n", b"DATA\r\n"):
            stream.write(line)
            stream.flush()
            while (reply := stream.readline())[3:4] == b"-":
                pass
        assert reply.startswith(b"354")
        stream.write(b"Subject: never finished\r\n\r\nhalf a messa")
        stream.flush()
        yield stream


def test_primary_down_then_up_delivers_each_message_once(deployment: Deployment) -> None:
    norwich = deployment.sink(NORWICH)
    relay = deployment.relay().start()
    sent = {deployment.send("s@sender.example", ["alice@verrotech.com"], message(n)): n
            for n in range(5)}
    relay.wait_for(r"destination verrotech\.com is down")
    queued = relay.queue_list()
    assert {m["id"] for m in queued} == set(sent)
    assert all(m["state"] in ("deferred", "active") for m in queued)

    primary = deployment.sink(PRIMARY)
    got = primary.wait_for_messages(5, timeout=30)
    relay.wait_for(r": delivered .*to=<alice@verrotech\.com>", count=5)
    assert relay.queue_list() == []

    assert primary.message_count == 5
    by_body = sorted(strip_received(m.data) for m in got)
    assert by_body == sorted(message(n) for n in range(5))
    for m in got:
        assert m.sender == "s@sender.example"
        assert m.recipients == ("alice@verrotech.com",)
        received = m.data.split(b"\r\n\t", 1)[0] + m.data.split(b"\r\n", 3)[1]
        assert b"by mail.verrotech.net" in m.data[:400]
        assert any(qid.encode() in m.data[:400] for qid in sent), received
    assert norwich.session_count == 0  # never hands mail to a less preferred MX
    assert relay.terminate() == 0


def test_partial_outcomes_delivered_retried_bounced(deployment: Deployment) -> None:
    primary = deployment.sink(PRIMARY)
    sender_mx = deployment.sink(SENDER_MX)
    primary.rcpt_reply["bob@verrotech.com"] = "450 4.2.1 mailbox busy"
    primary.rcpt_reply["carol@verrotech.com"] = "550 5.1.1 <carol@verrotech.com>: no such user"
    relay = deployment.relay().start()
    rcpts = ["alice@verrotech.com", "bob@verrotech.com", "carol@verrotech.com"]
    qid = deployment.send("s@sender.example", rcpts, message(1))

    [first] = primary.wait_for_messages(1, timeout=20)
    assert first.recipients == ("alice@verrotech.com",)
    [dsn] = sender_mx.wait_for_messages(1, timeout=20)
    assert dsn.sender == "" and dsn.recipients == ("s@sender.example",)
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.compat32)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    _temporary, permanent = all_failures(parsed)
    assert {a.decode() if isinstance(a, bytes) else a for a in permanent} == {
        "carol@verrotech.com"}

    shown = deployment.relay_class(deployment.config).cli("queue", "show", qid, "--json")
    assert shown.returncode == 0, shown.stderr
    del primary.rcpt_reply["bob@verrotech.com"]
    msgs = primary.wait_for_messages(2, timeout=20)
    assert msgs[1].recipients == ("bob@verrotech.com",)
    relay.wait_for(rf"{qid}: delivered .*to=<bob@verrotech\.com>")
    assert relay.queue_list() == []
    assert primary.message_count == 2  # alice once, bob once
    assert sender_mx.message_count == 1
    assert relay.terminate() == 0


def test_kill_9_loses_nothing_that_got_250(deployment: Deployment) -> None:
    relay = deployment.relay().start()
    sent = [deployment.send("s@sender.example", ["alice@verrotech.com"], message(n))
            for n in range(20)]
    # a client inside DATA when the relay dies: its message must leave no trace
    with client_inside_data(deployment):
        relay.kill()
    restarted = deployment.relay().start()
    assert {m["id"] for m in restarted.queue_list()} == set(sent)
    primary = deployment.sink(PRIMARY)
    got = primary.wait_for_messages(20, timeout=40)
    restarted.wait_for(r": delivered ", count=20)
    subjects = sorted(strip_received(m.data) for m in got)
    assert subjects == sorted(message(n) for n in range(20))
    assert all(b"never finished" not in m.data for m in primary.messages)
    assert restarted.terminate() == 0


def test_sigterm_exits_zero_and_keeps_the_queue(deployment: Deployment) -> None:
    relay = deployment.relay().start()
    qid = deployment.send("s@sender.example", ["alice@verrotech.com"], message(1))
    assert relay.terminate() == 0
    assert "stopped" in relay.log
    assert [m["id"] for m in relay.queue_list()] == [qid]


def test_sigterm_is_not_held_by_a_client_stuck_in_data(deployment: Deployment) -> None:
    """A client that stops sending inside DATA would hold the shutdown until
    data_timeout (10 minutes): after shutdown_grace it hears 421 instead, and
    nothing of its message is kept."""
    deployment.write_config(smtp={"shutdown_grace": "1s"})
    relay = deployment.relay().start()
    qid = deployment.send("s@sender.example", ["alice@verrotech.com"], message(1))
    with client_inside_data(deployment) as stream:
        assert relay.terminate(timeout=15) == 0
        assert stream.read().startswith(b"421 4.3.2 ")
    relay.wait_for("messages still arriving after 1 s are dropped")
    assert [m["id"] for m in relay.queue_list()] == [qid]


def test_a_second_sigterm_stops_at_once_and_keeps_what_was_acknowledged(
    deployment: Deployment,
) -> None:
    """The graceful stop waits for a client stuck in DATA (here up to a minute);
    an operator's second signal ends it now, as kill -9 would, with a log line."""
    deployment.write_config(smtp={"shutdown_grace": "60s"})
    relay = deployment.relay().start()
    qid = deployment.send("s@sender.example", ["alice@verrotech.com"], message(1))
    with client_inside_data(deployment) as stream:
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_for("stopping: no new connections")
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(timeout=10) == 1
        assert stream.read() == b""  # cut off: no 250 for the half-sent message
    relay.wait_for("stopping now, on a second SIGTERM")
    assert "Traceback" not in relay.log
    assert [m["id"] for m in relay.queue_list()] == [qid]


def test_serve_refuses_bad_config(deployment: Deployment) -> None:
    deployment.config.write_text(deployment.config.read_text() + "\n[smtp2]\nx = 1\n")
    relay = deployment.relay()
    relay.start(wait=False)
    assert relay.proc is not None and relay.proc.wait(timeout=20) == 1
    relay.wait_for("smtp2: unknown key")
    assert "Traceback" not in relay.log


def test_serve_refuses_unknown_schema_revision(deployment: Deployment, tmp_path: Path) -> None:
    relay = deployment.relay()
    assert relay.cli("db", "upgrade").returncode == 0
    import sqlite3

    with sqlite3.connect(tmp_path / "queue.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
    relay.start(wait=False)
    assert relay.proc is not None and relay.proc.wait(timeout=20) == 1
    relay.wait_for("unknown revision ffff9999")
    assert "Traceback" not in relay.log
    current = relay.cli("db", "current")
    assert "ffff9999" in current.stdout + current.stderr


@pytest.mark.parametrize(
    "deployment_config", [{"delivery": {"per_destination_concurrency": 2}}], indirect=True
)
def test_recovered_primary_gets_the_backlog_over_reused_sessions(
    deployment: Deployment,
) -> None:
    relay = deployment.relay().start()
    sent = [deployment.send("s@sender.example", ["alice@verrotech.com"], message(n))
            for n in range(40)]
    relay.wait_for(r"destination verrotech\.com is down")
    primary = deployment.sink(PRIMARY)
    flushed = relay.cli("queue", "flush", "--domain", "verrotech.com")
    assert flushed.returncode == 0, flushed.stderr
    got = primary.wait_for_messages(40, timeout=30)
    relay.wait_for(r": delivered ", count=40)
    assert sorted(strip_received(m.data) for m in got) == sorted(message(n) for n in range(40))
    # two sessions at a time, each carrying many messages (RSET between them)
    assert primary.session_count <= 4
    assert sum(s.commands.count("RSET") for s in primary.sessions) >= 40 - primary.session_count
    assert relay.queue_list() == []
    assert len(sent) == 40
    assert relay.terminate() == 0
