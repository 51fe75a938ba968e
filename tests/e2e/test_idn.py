"""End to end: an internationalised hosted domain is one domain, whatever its spelling.

`bücher.test` is `xn--bcher-kva.test` in A-label form. The relay hosts it
(configured in one spelling or the other); mail arrives over real SMTP from
an ASCII client (A-label), an SMTPUTF8 client (U-label) and in mixed case.
All of it is queued under the A-label: `queue list --domain` in either
spelling finds it, `queue stats` counts one domain, `flush --domain` and ETRN
in either spelling select it, the metrics label it by A-label, and delivery
looks up the MX of the A-label (the DNS server knows no other name) and hands
every recipient to the primary exactly as the client wrote it.
"""

from __future__ import annotations

import json
import smtplib
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.deployment import PRIMARY, RELAY, Deployment, message, strip_received
from tests.support.relay_process import RelayProcess, free_port

pytestmark = pytest.mark.slow

A_LABEL, U_LABEL = "xn--bcher-kva.test", "bücher.test"
SENDER = "s@sender.example"
QUICK = 10.0
# (recipient as the client writes it, client speaks SMTPUTF8)
SENT = [
    (f"uni@{A_LABEL}", False),
    (f"ulla@{U_LABEL}", True),
    ("Max@XN--Bcher-KVA.Test", False),
    ("moritz@BÜCHER.Test.", True),
]
# the recipients as queued and relayed: as written, but for the final dot
WRITTEN = sorted(rcpt.removesuffix(".") for rcpt, _ in SENT)


def send(deployment: Deployment, rcpt: str, utf8: bool, n: int) -> str:
    with smtplib.SMTP(RELAY, deployment.relay_port, timeout=10) as client:
        client.ehlo("client.sender.example")
        if utf8:
            client.command_encoding = "utf-8"  # what smtplib does for send_message(SMTPUTF8)
        code, reply = client.mail(SENDER, ["SMTPUTF8"] if utf8 else [])
        assert code == 250, reply
        code, reply = client.rcpt(rcpt)
        assert code == 250, (rcpt, reply)
        code, reply = client.data(message(n, to=rcpt.encode("ascii", "replace").decode()))
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def etrn(deployment: Deployment, node: str) -> tuple[int, bytes]:
    with smtplib.SMTP(RELAY, deployment.relay_port, timeout=10) as client:
        client.ehlo("client.sender.example")
        client.command_encoding = "utf-8"
        return client.docmd("ETRN", node)


def ok(relay: RelayProcess, *args: str) -> str:
    result = relay.cli(*args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def destination_up(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.labels["destination"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "relay_destination_up"}


def start(deployment: Deployment, configured: str, metrics_port: int = 0) -> RelayProcess:
    """The relay hosting `configured`, its mail accepted over SMTP (one message
    first, so the rest finds the destination down and parked): the queue IDs."""
    deployment.dns.add(A_LABEL, "MX", "10 mail.verrotech.com.", "20 mail.verrotech.net.")
    deployment.write_config(
        {"delivery": {"min_backoff": "10m", "max_backoff": "1h"}},  # no retry by itself
        smtp={"etrn_clients": ["127.0.0.0/8"], "etrn_interval": "0s"},
        metrics={"listen": f"127.0.0.1:{metrics_port}" if metrics_port else ""},
        domains={configured: {}},
    )
    return deployment.relay().start()


def send_all(deployment: Deployment, relay: RelayProcess) -> list[str]:
    ids = [send(deployment, *SENT[0], 0)]
    relay.wait_for(rf"destination {A_LABEL} is down")  # the MX lookup by A-label worked
    ids += [send(deployment, rcpt, utf8, n) for n, (rcpt, utf8) in enumerate(SENT) if n]
    return ids


def sent_messages() -> list[bytes]:
    return sorted(message(n, to=rcpt.encode("ascii", "replace").decode())
                  for n, (rcpt, _) in enumerate(SENT))


@pytest.mark.parametrize("configured", [U_LABEL, A_LABEL])
def test_an_idn_domain_is_one_domain_from_smtp_to_delivery(
        deployment: Deployment, configured: str) -> None:
    metrics_port = free_port("127.0.0.1")
    relay = start(deployment, configured, metrics_port)
    ids = send_all(deployment, relay)

    # listing by either spelling finds all of them; stats count one domain
    for spelling in (A_LABEL, U_LABEL, "XN--BCHER-KVA.TEST.", "Bücher.Test"):
        listed = json.loads(ok(relay, "queue", "list", "--json", "--domain", spelling))
        assert sorted(m["id"] for m in listed) == sorted(ids), spelling
    assert sorted(r["address"] for m in listed for r in m["recipients"]) == WRITTEN
    stats = json.loads(ok(relay, "queue", "stats", "--json"))
    assert stats["by_domain"] == {A_LABEL: len(SENT)}
    assert destination_up(metrics_port) == {A_LABEL: 0.0}

    # the primary is back: an ETRN in the U-label spelling delivers everything by MX
    primary = deployment.sink(PRIMARY)
    code, reply = etrn(deployment, "Bücher.Test")
    assert (code, reply) == (250, "2.0.0 Queuing for node Bücher.Test started".encode())
    got = primary.wait_for_messages(len(SENT), timeout=QUICK)
    assert sorted(r for m in got for r in m.recipients) == WRITTEN
    assert sorted(strip_received(m.data) for m in got) == sent_messages()
    assert {m.smtputf8 for m in got} == {True, False}  # SMTPUTF8 passed on where it was given
    for qid in ids:
        relay.wait_for(rf"{qid}: delivered ")
    assert relay.queue_list() == []
    assert destination_up(metrics_port) == {A_LABEL: 1.0}

    # an ETRN by A-label names the same hosted domain; a foreign IDN is not hosted
    code, reply = etrn(deployment, "XN--BCHER-KVA.TEST")
    assert (code, reply) == (250, b"2.0.0 Queuing for node XN--BCHER-KVA.TEST started")
    assert etrn(deployment, "bücher.example")[0] == 458
    assert relay.terminate() == 0


def test_flush_by_domain_in_either_spelling(deployment: Deployment) -> None:
    relay = start(deployment, A_LABEL)
    ids = send_all(deployment, relay)
    assert relay.terminate() == 0  # the CLI alone: nothing moves the mail but the flush
    for spelling in (U_LABEL, "XN--Bcher-KVA.test."):
        assert ok(relay, "queue", "flush", "--domain", spelling).strip() == "4 messages flushed"
    primary = deployment.sink(PRIMARY)
    relay = deployment.relay().start()  # due now, and the destination no longer down
    got = primary.wait_for_messages(len(SENT), timeout=QUICK)
    assert sorted(strip_received(m.data) for m in got) == sent_messages()
    for qid in ids:
        relay.wait_for(rf"{qid}: delivered ")
    assert relay.terminate() == 0
