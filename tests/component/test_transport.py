"""SmtpTransport against real SMTP servers on loopback (tests/support/smtp_sink.py).

No mock of aiosmtplib: every test speaks SMTP over a socket to a sink whose
answers it scripts, then checks the report and what the sink received.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable

import pytest

from relay.core.model import Hop, OutboundMessage, Outcome, Reply
from relay.delivery.transport import SmtpTransport, TlsPolicy
from tests.support.smtp_sink import Sink, closed_port, sink_ca

MX = "mail.verrotech.com"
SENDER = "alice@example.org"
BOB = "bob@verrotech.com"
CAROL = "carol@verrotech.com"
DAVE = "dave@verrotech.com"

StartSink = Callable[..., Sink]


_made: list[SmtpTransport] = []


def transport(tls: TlsPolicy = "none", **kwargs: float) -> SmtpTransport:
    options: dict[str, float] = {"connect_timeout": 5.0, "command_timeout": 10.0}
    options.update(kwargs)
    made = SmtpTransport(helo_name="mail.verrotech.net", tls=tls, **options)  # type: ignore[arg-type]
    _made.append(made)
    return made


@pytest.fixture(autouse=True)
async def _close_cached_sessions() -> AsyncIterator[None]:
    """Cached sessions outlive a delivery: QUIT them before the sink goes away."""
    yield
    while _made:
        await _made.pop().close()


def hop(port: int, host: str = MX, address: str = "127.0.0.1") -> Hop:
    return Hop(host=host, address=address, port=port, preference=10)


def message(
    *recipients: str,
    sender: str = SENDER,
    data: bytes | None = None,
    smtputf8: bool = False,
    eightbit: bool = False,
) -> OutboundMessage:
    if data is None:
        data = (
            b"Received: from client.example.org by mail.verrotech.net; Mon, 1 Jan 2024\r\n"
            b"From: Alice <alice@example.org>\r\n"
            b"To: bob@verrotech.com\r\n"
            b"Subject: hello\r\n"
            b"\r\n"
            b"Hello Bob.\r\n"
        )
    return OutboundMessage(
        queue_id="Q1",
        sender=sender,
        recipients=recipients or (BOB,),
        data=data,
        smtputf8=smtputf8,
        eightbit=eightbit,
    )


def label(sink: Sink, host: str = MX) -> str:
    return f"{host}[{sink.host}]:{sink.port}"


# ------------------------------------------------------------------ delivered


async def test_delivered_bytes_identical_with_dots_and_8bit(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    data = (
        "From: Jörg <jörg@example.org>\r\n"
        "To: bob@verrotech.com\r\n"
        "Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
        "\r\n"
        "Grüße aus Köln.\r\n"
        ".a line that starts with a dot\r\n"
        ".\r\n"
        "..two dots\r\n"
        " .\r\n"
        "last line\r\n"
    ).encode()
    msg = message(BOB, CAROL, sender="jörg@example.org", data=data, smtputf8=True, eightbit=True)

    report = await transport().deliver(msg, [hop(sink.port)])

    assert report.remote_host == label(sink)
    assert not report.site_failure
    assert report.errors == ()
    assert set(report.replies) == {BOB, CAROL}
    assert all(r.outcome is Outcome.DELIVERED for r in report.replies.values())
    assert report.replies[BOB].code == 250
    assert report.replies[BOB].text.startswith("2.0.0 Ok: queued as SINK")
    [got] = sink.messages
    assert got.data == data
    assert got.sender == "jörg@example.org"
    assert got.recipients == (BOB, CAROL)
    assert got.body == "8BITMIME"
    assert got.smtputf8
    assert got.size == len(data)
    assert got.ehlo_name == "mail.verrotech.net"
    assert not got.tls


async def test_bytes_are_not_normalised(smtp_sink: StartSink) -> None:
    # aiosmtplib's data() turns lone LF/CR into CRLF; the relay must not.
    sink = smtp_sink()
    data = b"Subject: x\r\n\r\nbare\nlf and bare\rcr stay as they are\r\n"
    report = await transport().deliver(message(data=data), [hop(sink.port)])
    assert report.replies[BOB].code == 250
    assert sink.messages[0].data == data


async def test_data_without_final_crlf_gets_one(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    report = await transport().deliver(message(data=b"Subject: x\r\n\r\nno end"), [hop(sink.port)])
    assert report.replies[BOB].code == 250
    assert sink.messages[0].data == b"Subject: x\r\n\r\nno end\r\n"


async def test_no_body_option_without_8bit_and_none_unless_offered(smtp_sink: StartSink) -> None:
    plain = smtp_sink()
    await transport().deliver(message(), [hop(plain.port)])
    assert plain.messages[0].body is None
    assert not plain.messages[0].smtputf8

    seven_bit = smtp_sink(eightbitmime=False)
    data = "Subject: x\r\n\r\nnaïve\r\n".encode()
    report = await transport().deliver(message(data=data, eightbit=True), [hop(seven_bit.port)])
    # Postfix sends 8-bit data to a server without 8BITMIME anyway.
    assert report.replies[BOB].code == 250
    assert seven_bit.messages[0].body is None
    assert seven_bit.messages[0].data == data


async def test_null_sender(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    report = await transport().deliver(message(sender=""), [hop(sink.port)])
    assert report.replies[BOB].code == 250
    assert sink.messages[0].sender == ""


# --------------------------------------------------------- per-recipient replies


async def test_partial_per_recipient_replies(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    sink.rcpt_reply[CAROL] = "450 4.2.1 mailbox busy"
    sink.rcpt_reply[DAVE] = f"550 5.1.1 <{DAVE}>: User unknown"

    report = await transport().deliver(message(BOB, CAROL, DAVE), [hop(sink.port)])

    assert report.replies[BOB].code == 250
    assert report.replies[CAROL] == Reply(450, "4.2.1 mailbox busy")
    assert report.replies[CAROL].outcome is Outcome.DEFERRED
    assert str(report.replies[DAVE]) == f"550 5.1.1 <{DAVE}>: User unknown"
    assert report.replies[DAVE].outcome is Outcome.BOUNCED
    assert report.replies[DAVE].enhanced_status == "5.1.1"
    assert report.remote_host == label(sink)
    assert not report.site_failure
    [got] = sink.messages
    assert got.recipients == (BOB,)


async def test_data_reply_applies_to_every_accepted_recipient(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    sink.rcpt_reply[DAVE] = "550 5.1.1 no such user"
    sink.data_reply = "554 5.7.1 rejected by content filter"

    report = await transport().deliver(message(BOB, CAROL, DAVE), [hop(sink.port)])

    assert report.replies[BOB] == Reply(554, "5.7.1 rejected by content filter")
    assert report.replies[CAROL] == Reply(554, "5.7.1 rejected by content filter")
    assert report.replies[DAVE] == Reply(550, "5.1.1 no such user")
    assert sink.messages == []
    assert [m.recipients for m in sink.received] == [(BOB, CAROL)]


async def test_no_recipient_accepted_sends_no_data(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    sink.rcpt_reply[BOB] = "550 5.1.1 no such user"
    sink.rcpt_reply[CAROL] = "450 4.2.0 greylisted"

    report = await transport().deliver(message(BOB, CAROL), [hop(sink.port)])

    assert report.replies == {
        BOB: Reply(550, "5.1.1 no such user"),
        CAROL: Reply(450, "4.2.0 greylisted"),
    }
    assert sink.received == []
    assert "DATA" not in sink.sessions[0].commands


async def test_mail_5xx_decides_every_recipient_without_next_hop(smtp_sink: StartSink) -> None:
    first, second = smtp_sink(), smtp_sink()
    first.mail_reply = "553 5.7.1 sender rejected"

    report = await transport().deliver(message(BOB, CAROL), [hop(first.port), hop(second.port)])

    assert report.replies == dict.fromkeys((BOB, CAROL), Reply(553, "5.7.1 sender rejected"))
    assert report.remote_host == label(first)
    assert not report.site_failure
    assert second.session_count == 0


async def test_connection_lost_at_rcpt_defers_undecided(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    sink.disconnect_on = "RCPT"

    report = await transport().deliver(message(BOB, CAROL), [hop(sink.port), hop(sink.port)])

    assert set(report.replies) == {BOB, CAROL}
    for reply in report.replies.values():
        assert reply.code == 451
        assert reply.text == f"4.4.2 lost connection with {label(sink)} while sending RCPT TO"
    assert report.remote_host == label(sink)
    assert not report.site_failure
    assert sink.session_count == 1  # the hop decided: no second try


async def test_connection_lost_after_data_defers_accepted(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    sink.rcpt_reply[CAROL] = "550 5.1.1 no such user"
    sink.disconnect_on = "DATA"

    report = await transport().deliver(message(BOB, CAROL), [hop(sink.port)])

    assert report.replies[CAROL] == Reply(550, "5.1.1 no such user")
    assert report.replies[BOB].code == 451
    assert report.replies[BOB].text.startswith(f"4.4.2 lost connection with {label(sink)}")
    assert "message may be sent more than once" in report.replies[BOB].text


async def test_421_to_rcpt_defers_every_undecided_recipient(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    sink.rcpt_reply[DAVE] = "550 5.1.1 no such user"
    sink.rcpt_reply[CAROL] = "421 4.3.2 shutting down"
    bye = Reply(421, "4.3.2 shutting down")

    report = await transport().deliver(
        message(DAVE, BOB, CAROL, "erin@verrotech.com"), [hop(sink.port)]
    )

    assert report.replies == {
        DAVE: Reply(550, "5.1.1 no such user"),
        BOB: bye,
        CAROL: bye,
        "erin@verrotech.com": bye,
    }
    assert sink.received == []


# ------------------------------------------------------------------- hops


async def test_first_hop_refused_second_used(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    dead = closed_port()
    hops = [hop(dead, host="mx1.verrotech.com"), hop(sink.port, host="mx2.verrotech.com")]

    report = await transport().deliver(message(), hops)

    assert report.replies[BOB].code == 250
    assert report.remote_host == label(sink, "mx2.verrotech.com")
    assert not report.site_failure
    assert report.errors == (
        f"451 4.4.1 connect to mx1.verrotech.com[127.0.0.1]:{dead}: Connection refused",
    )
    assert sink.message_count == 1


async def test_all_hops_refused_is_a_site_failure(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    sink.stop()  # the primary is down: its port refuses connections
    dead = closed_port()
    hops = [hop(dead, host="mx1.verrotech.com"), hop(sink.port, host=MX)]

    report = await transport().deliver(message(BOB, CAROL), hops)

    assert report.site_failure
    assert report.remote_host is None
    expected = Reply(451, f"4.4.1 connect to {label(sink)}: Connection refused")
    assert report.replies == {BOB: expected, CAROL: expected}
    assert report.replies[BOB].outcome is Outcome.DEFERRED
    assert len(report.errors) == 2
    assert "mx1.verrotech.com[127.0.0.1]" in report.errors[0]

    sink.start()  # the primary is back, on the same port
    report = await transport().deliver(message(BOB, CAROL), hops)
    assert not report.site_failure
    assert report.remote_host == label(sink)
    assert sink.message_count == 1


async def test_no_hops_is_a_site_failure() -> None:
    report = await transport().deliver(message(), [])
    assert report.site_failure
    assert report.replies[BOB].outcome is Outcome.DEFERRED


async def test_421_greeting_next_hop(smtp_sink: StartSink) -> None:
    busy = smtp_sink(refuse_sessions=True)
    good = smtp_sink()

    report = await transport().deliver(
        message(), [hop(busy.port, host="mx1.verrotech.com"), hop(good.port)]
    )

    assert report.replies[BOB].code == 250
    assert report.remote_host == label(good)
    assert busy.sessions[0].refused
    [error] = report.errors
    assert error.startswith(
        f"421 4.3.2 host mx1.verrotech.com[127.0.0.1]:{busy.port} refused to talk to me: 421 4.3.2"
    )


async def test_421_greeting_on_every_hop_defers(smtp_sink: StartSink) -> None:
    busy = smtp_sink(refuse_sessions=True, refusal="554 5.3.2 go away")
    report = await transport().deliver(message(), [hop(busy.port)])
    assert report.site_failure
    # A 5xx greeting only means "try elsewhere": softened to 4xx, as Postfix does.
    assert report.replies[BOB].code == 451
    assert report.replies[BOB].enhanced_status == "4.3.2"


async def test_mail_4xx_next_hop(smtp_sink: StartSink) -> None:
    first, second = smtp_sink(), smtp_sink()
    first.mail_reply = "451 4.3.0 try again later"

    report = await transport().deliver(message(), [hop(first.port), hop(second.port)])

    assert report.replies[BOB].code == 250
    assert report.remote_host == label(second)
    assert report.errors == (
        f"451 4.3.0 host {label(first)} said: 451 4.3.0 try again later"
        " (in reply to MAIL FROM command)",
    )
    assert first.received == []


async def test_silent_server_times_out_then_next_hop(smtp_sink: StartSink) -> None:
    good = smtp_sink()
    async with silent_server() as port:
        report = await transport(connect_timeout=0.5).deliver(
            message(), [hop(port, host="mx1.verrotech.com"), hop(good.port)]
        )
    assert report.replies[BOB].code == 250
    [error] = report.errors
    assert "timed out while receiving the initial server greeting" in error


async def test_ehlo_rejected_falls_back_to_helo(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    sink.ehlo_reply = "502 5.5.1 EHLO not implemented"

    report = await transport().deliver(message(eightbit=True), [hop(sink.port)])

    assert report.replies[BOB].code == 250
    assert not sink.sessions[0].esmtp
    assert sink.messages[0].mail_options == ()


# ------------------------------------------------------------------ SMTPUTF8, SIZE


async def test_smtputf8_needed_but_not_offered_bounces(smtp_sink: StartSink) -> None:
    sink = smtp_sink(smtputf8=False)
    msg = message("rené@verrotech.com", smtputf8=True)

    report = await transport().deliver(msg, [hop(sink.port)])

    reply = report.replies["rené@verrotech.com"]
    assert reply.code == 550
    assert reply.enhanced_status == "5.6.7"
    assert reply.outcome is Outcome.BOUNCED
    assert report.remote_host == label(sink)
    assert "MAIL" not in sink.sessions[0].commands


async def test_smtputf8_not_needed_goes_without_it(smtp_sink: StartSink) -> None:
    sink = smtp_sink(smtputf8=False)
    report = await transport().deliver(message(smtputf8=True), [hop(sink.port)])
    assert report.replies[BOB].code == 250
    assert not sink.messages[0].smtputf8


async def test_message_over_advertised_size_bounces(smtp_sink: StartSink) -> None:
    sink = smtp_sink(data_size_limit=100)
    msg = message(data=b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n")
    report = await transport().deliver(msg, [hop(sink.port)])
    assert report.replies[BOB].code == 552
    assert report.replies[BOB].enhanced_status == "5.3.4"
    assert sink.received == []


# --------------------------------------------------------------------- TLS


async def test_opportunistic_tls_used_when_offered(smtp_sink: StartSink) -> None:
    sink = smtp_sink(tls=True)
    report = await transport("opportunistic").deliver(message(), [hop(sink.port)])
    assert report.replies[BOB].code == 250
    assert sink.sessions[0].tls
    assert sink.messages[0].tls
    assert sink.messages[0].ehlo_name == "mail.verrotech.net"


async def test_opportunistic_tls_without_offer_is_plaintext(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    report = await transport("opportunistic").deliver(message(), [hop(sink.port)])
    assert report.replies[BOB].code == 250
    assert not sink.messages[0].tls


async def test_tls_none_never_starts_tls(smtp_sink: StartSink) -> None:
    sink = smtp_sink(tls=True)
    await transport("none").deliver(message(), [hop(sink.port)])
    assert not sink.messages[0].tls


async def test_opportunistic_handshake_failure_retries_in_plaintext(
    smtp_sink: StartSink,
) -> None:
    sink = smtp_sink(tls=_client_cert_required_context())

    report = await transport("opportunistic").deliver(message(), [hop(sink.port)])

    assert report.replies[BOB].code == 250
    assert report.remote_host == label(sink)
    [error] = report.errors
    assert error.startswith(f"451 4.7.5 Cannot start TLS with {label(sink)}")
    assert sink.session_count == 2
    assert not sink.messages[0].tls


async def test_required_tls_not_offered_defers(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    report = await transport("required").deliver(message(), [hop(sink.port)])
    assert report.site_failure
    reply = report.replies[BOB]
    assert reply.outcome is Outcome.DEFERRED
    assert reply.text == f"4.7.4 TLS is required, but was not offered by host {label(sink)}"
    assert sink.received == []


async def test_required_tls_handshake_failure_defers(smtp_sink: StartSink) -> None:
    sink = smtp_sink(tls=_client_cert_required_context())
    report = await transport("required").deliver(message(), [hop(sink.port)])
    assert report.site_failure
    assert report.replies[BOB].enhanced_status == "4.7.5"
    assert sink.session_count == 1
    assert sink.received == []


async def test_required_tls_used_when_offered(smtp_sink: StartSink) -> None:
    sink = smtp_sink(tls=True)
    report = await transport("required").deliver(message(), [hop(sink.port)])
    assert report.replies[BOB].code == 250
    assert sink.messages[0].tls


# ----------------------------------------------------------------- helpers


def _client_cert_required_context() -> ssl.SSLContext:
    """A server context no client without a certificate can shake hands with.

    TLS 1.2 at most, so the server's demand for a client certificate fails the
    handshake itself (with TLS 1.3 it would fail only after it).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    sink_ca().issue_cert("127.0.0.1").configure_cert(ctx)
    sink_ca().configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class silent_server:
    """A TCP server in this loop that accepts connections and never says a word."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.append(writer)
            await reader.read()  # until the client gives up and closes

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self._server.wait_closed()


# ------------------------------------------------------------ connection reuse


async def test_messages_to_one_address_share_a_session(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    client = transport()
    for _ in range(3):
        report = await client.deliver(message(), [hop(sink.port)])
        assert report.replies[BOB].code == 250
    assert sink.message_count == 3
    assert sink.session_count == 1
    assert client.sessions_opened == 1
    assert sink.sessions[0].commands.count("RSET") == 2  # between transactions
    await client.close()
    sink.wait_for_sessions(1)
    assert "QUIT" in sink.sessions[0].commands


async def test_reuse_limit_opens_a_fresh_session(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    client = transport(reuse_limit=2)
    for _ in range(5):
        await client.deliver(message(), [hop(sink.port)])
    assert sink.message_count == 5
    assert client.sessions_opened == 3


async def test_stale_cached_session_is_replaced_without_a_hop_failure(
    smtp_sink: StartSink,
) -> None:
    sink = smtp_sink()
    client = transport()
    await client.deliver(message(), [hop(sink.port)])
    sink.stop()  # cuts the idle connection
    sink.start()
    report = await client.deliver(message(), [hop(sink.port)])
    assert report.replies[BOB].code == 250
    assert not report.site_failure and report.errors == ()
    assert sink.message_count == 2
    assert client.sessions_opened == 2


async def test_a_session_after_421_is_not_reused(smtp_sink: StartSink) -> None:
    sink = smtp_sink()
    sink.rcpt_reply[BOB] = "421 4.7.0 too many connections"
    client = transport()
    report = await client.deliver(message(), [hop(sink.port)])
    assert report.replies[BOB].code == 421
    del sink.rcpt_reply[BOB]
    report = await client.deliver(message(), [hop(sink.port)])
    assert report.replies[BOB].code == 250
    assert client.sessions_opened == 2
