"""Outbound timeouts and the uncertain outcome over real sockets: a next hop
that cuts the connection or falls silent after the final dot (RFC 1047), and
one that stalls at EHLO. The sink (tests/support/smtp_sink.py) plays the hop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest

from relay.core.model import Hop, OutboundMessage, Outcome
from relay.delivery.transport import SmtpTransport
from tests.support.smtp_sink import Sink

MX = "mail.verrotech.com"
BOB = "bob@verrotech.com"
CAROL = "carol@verrotech.com"
DATA = b"From: Alice <alice@example.org>\r\nSubject: hi\r\n\r\nHello.\r\n"

StartSink = Callable[..., Sink]


@pytest.fixture
async def made() -> AsyncIterator[list[SmtpTransport]]:
    transports: list[SmtpTransport] = []
    yield transports
    for transport in transports:
        await transport.close()


def hops(*sinks: Sink) -> list[Hop]:
    return [Hop(host=MX, address=s.host, port=s.port, preference=10) for s in sinks]


def message(*recipients: str) -> OutboundMessage:
    return OutboundMessage("Q1", "alice@example.org", recipients or (BOB,), DATA)


def label(sink: Sink) -> str:
    return f"{MX}[{sink.host}]:{sink.port}"


async def test_a_cut_after_the_final_dot_is_uncertain(
    smtp_sink: StartSink, made: list[SmtpTransport]
) -> None:
    sink = smtp_sink()
    sink.rcpt_reply[CAROL] = "550 5.1.1 no such user"
    sink.disconnect_on = "DATA"  # after the data and its final dot: no reply
    transport = SmtpTransport(helo_name="relay.test", tls="none", connect_timeout=5.0)
    made.append(transport)

    report = await transport.deliver(message(BOB, CAROL), hops(sink))

    bob = report.replies[BOB]
    assert bob.uncertain and bob.outcome is Outcome.UNCERTAIN
    assert bob.code == 451
    assert bob.text.startswith(
        f"4.4.2 lost connection with {label(sink)} while sending end of data")
    assert not report.replies[CAROL].uncertain  # refused at RCPT: that one is certain
    assert report.remote_host == label(sink) and not report.site_failure


async def test_silence_after_the_final_dot_times_out_as_uncertain(
    smtp_sink: StartSink, made: list[SmtpTransport]
) -> None:
    sink = smtp_sink()
    sink.stall_on = "DATA"
    transport = SmtpTransport(helo_name="relay.test", tls="none", connect_timeout=5.0,
                              command_timeout=10.0, data_timeout=0.5)
    made.append(transport)

    started = time.monotonic()
    report = await transport.deliver(message(), hops(sink))

    reply = report.replies[BOB]
    assert reply.uncertain
    assert reply.text.startswith(f"4.4.2 conversation with {label(sink)} timed out while sending")
    assert time.monotonic() - started < 5.0  # data_timeout, not command_timeout


async def test_a_stalled_ehlo_times_out_and_the_next_hop_delivers(
    smtp_sink: StartSink, made: list[SmtpTransport]
) -> None:
    stalled, working = smtp_sink(), smtp_sink()
    stalled.stall_on = "EHLO"
    transport = SmtpTransport(helo_name="relay.test", tls="none", connect_timeout=5.0,
                              command_timeout=0.5)
    made.append(transport)

    report = await transport.deliver(message(), hops(stalled, working))

    assert report.replies[BOB].code == 250
    assert report.errors == (
        f"451 4.4.2 conversation with {label(stalled)} timed out"
        " while performing the EHLO handshake",
    )
    assert working.message_count == 1


async def test_a_reply_that_comes_is_never_uncertain(
    smtp_sink: StartSink, made: list[SmtpTransport]
) -> None:
    sink = smtp_sink()
    sink.data_reply = "451 4.3.0 try later"
    transport = SmtpTransport(helo_name="relay.test", tls="none", connect_timeout=5.0)
    made.append(transport)

    report = await transport.deliver(message(), hops(sink))

    assert report.replies[BOB].outcome is Outcome.DEFERRED
    assert not report.replies[BOB].uncertain
