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
import smtplib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flufl.bounce import all_failures

from tests.support.dns_server import DnsServer
from tests.support.relay_process import RelayProcess, free_port
from tests.support.smtp_sink import Sink

pytestmark = pytest.mark.slow

PRIMARY, RELAY, NORWICH, SENDER_MX = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"


@dataclass
class Deployment:
    dns: DnsServer
    config: Path
    relay_port: int
    mx_port: int  # the port every MX host listens on (delivery.port)
    start_sink: Callable[..., Sink]
    relay_class: type[RelayProcess]

    def relay(self) -> RelayProcess:
        return self.relay_class(self.config)

    def sink(self, host: str, **options: object) -> Sink:
        return self.start_sink(host, self.mx_port, **options)

    def send(self, sender: str, recipients: list[str], data: bytes) -> str:
        """One SMTP session to the relay; returns the queue ID from the 250 reply."""
        with smtplib.SMTP(RELAY, self.relay_port, timeout=10) as client:
            client.ehlo("client.sender.example")
            client.mail(sender)
            for rcpt in recipients:
                code, reply = client.rcpt(rcpt)
                assert code == 250, reply
            code, reply = client.data(data)
            assert code == 250, reply
        text = reply.decode()
        assert text.startswith("2.0.0 Ok: queued as "), text
        return text.rsplit(" ", 1)[1]


@pytest.fixture
def deployment(tmp_path: Path, dns_server: DnsServer, smtp_sink: Callable[..., Sink],
               relay_process: type[RelayProcess]) -> Iterator[Deployment]:
    mx_port = free_port(PRIMARY, NORWICH, SENDER_MX)
    relay_port = free_port(RELAY)
    dns_server.add("verrotech.com", "MX", "10 mail.verrotech.com.", "20 mail.verrotech.net.",
                   "30 mail.noc.verrotech.com.")
    dns_server.add("mail.verrotech.com", "A", PRIMARY)
    dns_server.add("mail.verrotech.net", "A", RELAY)
    dns_server.add("mail.noc.verrotech.com", "A", NORWICH)
    dns_server.add("sender.example", "MX", "10 mx.sender.example.")
    dns_server.add("mx.sender.example", "A", SENDER_MX)
    host, port = dns_server.address
    config = tmp_path / "hektor.toml"
    config.write_text(f"""
[node]
hostname = "mail.verrotech.net"

[smtp]
listen = ["{RELAY}:{relay_port}"]

[queue]
url = "sqlite:///{tmp_path}/queue.db"

[delivery]
port = {mx_port}
min_backoff = "1s"
max_backoff = "2s"
connect_timeout = "2s"

[dns]
nameservers = ["{host}:{port}"]
timeout = "2s"

[metrics]
listen = ""

[domains."verrotech.com"]
""")
    yield Deployment(dns_server, config, relay_port, mx_port, smtp_sink, relay_process)


def message(n: int, to: str = "alice@verrotech.com") -> bytes:
    return (
        f"From: Sender <s@sender.example>\r\nTo: <{to}>\r\nSubject: message {n}\r\n"
        f"Message-ID: <m{n}@sender.example>\r\n\r\nHello {n}.\r\n.leading dot line\r\n"
    ).encode()


def strip_received(data: bytes) -> bytes:
    """Remove our Received header (the first field, with its folded lines)."""
    assert data.startswith(b"Received: ")
    lines = data.split(b"\r\n")
    rest = 1
    while lines[rest][:1] in (b" ", b"\t"):
        rest += 1
    return b"\r\n".join(lines[rest:])


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
    partial = socket.create_connection((RELAY, deployment.relay_port), timeout=10)
    with partial, partial.makefile("rwb") as stream:
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
