"""`delivery.tls = "verify"` over real sockets: trustme certificates for a
next hop with the right name, the wrong name and an unknown CA; and
"required", which still takes a certificate nobody vouches for.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trustme

from relay.core.model import Hop, OutboundMessage
from relay.delivery.transport import SmtpTransport, TlsPolicy, verifying_tls_context
from tests.support.smtp_sink import Sink, sink_ca

MX = "mx.verrotech.com"
BOB = "bob@verrotech.com"
DATA = b"From: Alice <alice@example.org>\r\nSubject: hi\r\n\r\nHello.\r\n"

StartSink = Callable[..., Sink]


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    sink_ca().cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def made() -> AsyncIterator[list[SmtpTransport]]:
    transports: list[SmtpTransport] = []
    yield transports
    for transport in transports:
        await transport.close()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


async def deliver(made: list[SmtpTransport], tls: TlsPolicy, ca_file: str | None,
                  *hops: Hop) -> tuple[dict[str, str], tuple[str, ...]]:
    transport = SmtpTransport(
        helo_name="relay.test", tls=tls, connect_timeout=5.0, command_timeout=10.0,
        verify_context=verifying_tls_context(ca_file) if ca_file else None,
    )
    made.append(transport)
    message = OutboundMessage("Q1", "alice@example.org", (BOB,), DATA)
    report = await transport.deliver(message, hops)
    return {r: str(reply) for r, reply in report.replies.items()}, report.errors


def hop(sink: Sink, host: str = MX) -> Hop:
    return Hop(host=host, address=sink.host, port=sink.port, preference=10)


async def test_a_certificate_for_the_mx_name_verifies(
    smtp_sink: StartSink, made: list[SmtpTransport], ca_file: str
) -> None:
    sink = smtp_sink(tls=server_context(sink_ca(), MX))

    replies, errors = await deliver(made, "verify", ca_file, hop(sink))

    assert replies[BOB].startswith("250 ")
    assert errors == ()
    assert sink.messages[0].tls


async def test_an_ip_literal_next_hop_verifies_against_the_ip(
    smtp_sink: StartSink, made: list[SmtpTransport], ca_file: str
) -> None:
    sink = smtp_sink(tls=server_context(sink_ca(), "127.0.0.1"))

    replies, _ = await deliver(made, "verify", ca_file, hop(sink, host="[127.0.0.1]"))

    assert replies[BOB].startswith("250 ")


async def test_a_wrong_name_defers_naming_the_mismatch_and_the_next_hop_is_tried(
    smtp_sink: StartSink, made: list[SmtpTransport], ca_file: str
) -> None:
    wrong = smtp_sink(tls=server_context(sink_ca(), "other.example.net"))
    right = smtp_sink(tls=server_context(sink_ca(), "mx2.verrotech.com"))

    replies, errors = await deliver(
        made, "verify", ca_file, hop(wrong), hop(right, "mx2.verrotech.com"))

    assert replies[BOB].startswith("250 ")
    [error] = errors
    assert error.startswith(f"451 4.7.5 Cannot start TLS with {MX}[")
    assert "certificate verify failed: Hostname mismatch" in error
    assert wrong.message_count == 0 and right.message_count == 1


async def test_an_unknown_ca_defers_naming_the_issuer_problem(
    smtp_sink: StartSink, made: list[SmtpTransport], ca_file: str
) -> None:
    sink = smtp_sink(tls=server_context(trustme.CA(), MX))

    replies, errors = await deliver(made, "verify", ca_file, hop(sink))

    assert replies[BOB].startswith("451 4.7.5 Cannot start TLS with ")
    assert "certificate verify failed: unable to get local issuer certificate" in replies[BOB]
    assert len(errors) == 1  # verify never falls back to plaintext
    assert sink.message_count == 0


async def test_verify_without_starttls_defers(
    smtp_sink: StartSink, made: list[SmtpTransport], ca_file: str
) -> None:
    sink = smtp_sink()  # no STARTTLS offered

    replies, _ = await deliver(made, "verify", ca_file, hop(sink))

    assert replies[BOB].startswith("451 4.7.4 TLS is required, but was not offered by host")


async def test_required_takes_a_certificate_from_an_unknown_ca(
    smtp_sink: StartSink, made: list[SmtpTransport]
) -> None:
    sink = smtp_sink(tls=server_context(trustme.CA(), "somebody.else.example"))

    replies, _ = await deliver(made, "required", None, hop(sink))

    assert replies[BOB].startswith("250 ")
    assert sink.messages[0].tls
