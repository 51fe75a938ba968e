"""relay.delivery.dsn with RFC 3461 parameters: ENVID, ORCPT, RET, `relayed`, and
RFC 6533's UTF-8 types; each DSN parsed back by the stdlib and by flufl.bounce."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta
from email.message import Message

from flufl.bounce import all_failures, scan_message

from relay.core.model import Reply
from relay.delivery.dsn import Dsn, RecipientNotice, build_dsn

ARRIVAL = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
NOW = ARRIVAL + timedelta(hours=1)
HEADERS = b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: report\r\n"
ORIGINAL = HEADERS + b"\r\nThe secret body.\r\n"
BOB = RecipientNotice("bob@example.com", "failed", Reply(550, "5.1.1 unknown"),
                      remote_mta="mx.example.com", last_attempt=NOW,
                      original_recipient=("rfc822", "Bob+list@example.com"))


def build(notices: list[RecipientNotice], *, original: bytes = ORIGINAL,
          **params: object) -> Dsn:
    return build_dsn(reporting_mta="mx2.example.net", original_sender="alice@example.org",
                     queue_id="Q1", dsn_id="D1", arrival=ARRIVAL, now=NOW, notices=notices,
                     original=original, **params)  # type: ignore[arg-type]


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.default)


def types(msg: Message) -> list[str]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p.get_content_type() for p in payload]


def status_blocks(msg: Message) -> list[Message]:
    (report,) = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return blocks


def test_envid_and_orcpt_appear_in_the_report() -> None:
    dsn = build([BOB], envid="QX 42")
    msg = parse(dsn.data)
    per_message, bob = status_blocks(msg)
    assert per_message["Original-Envelope-Id"] == "QX 42"
    assert bob["Original-Recipient"] == "rfc822; Bob+list@example.com"
    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    # an independent parser reports the address the sender used: the ORCPT
    assert scan_message(msg) == {b"Bob+list@example.com"}


def test_without_parameters_no_new_fields() -> None:
    plain = RecipientNotice("bob@example.com", "failed", Reply(550, "5.1.1 unknown"))
    data = build([plain]).data
    assert b"Original-Envelope-Id" not in data and b"Original-Recipient" not in data


def test_ret_full_returns_the_whole_message_in_a_failure_report() -> None:
    dsn = build([BOB], ret="FULL")
    msg = parse(dsn.data)
    assert types(msg) == ["text/plain", "message/delivery-status", "message/rfc822"]
    payload = msg.get_payload()
    assert isinstance(payload, list)
    returned = payload[2].get_payload()[0]
    assert returned["Subject"] == "report"
    assert returned.get_content() == "The secret body.\r\n"
    assert all_failures(email.message_from_bytes(dsn.data))[1] == {b"Bob+list@example.com"}


def test_ret_hdrs_and_unset_return_the_headers_only() -> None:
    for ret in ("HDRS", None):
        dsn = build([BOB], ret=ret)
        msg = parse(dsn.data)
        assert types(msg) == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
        assert b"secret body" not in dsn.data


def test_ret_full_in_a_delay_report_returns_the_headers_only() -> None:
    late = RecipientNotice("bob@example.com", "delayed", Reply(451, "4.4.1 later"))
    dsn = build([late], ret="FULL")
    assert types(parse(dsn.data))[2] == "text/rfc822-headers"
    assert b"secret body" not in dsn.data


def test_ret_full_with_a_nul_falls_back_to_the_headers() -> None:
    dsn = build([BOB], ret="FULL", original=HEADERS + b"\r\nbad\x00body\r\n")
    assert types(parse(dsn.data))[2] == "text/rfc822-headers"


def test_relayed_report() -> None:
    relayed = RecipientNotice("bob@example.com", "relayed", Reply(250, "2.0.0 Ok: queued"),
                              remote_mta="mx.example.com", last_attempt=NOW)
    dsn = build([relayed], envid="E1")
    msg = parse(dsn.data)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    _, bob = status_blocks(msg)
    assert (bob["Action"], bob["Status"]) == ("relayed", "2.0.0")
    assert bob["Remote-MTA"] == "dns; mx.example.com"
    assert bob["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued"
    assert scan_message(email.message_from_bytes(dsn.data)) == set()
    payload = msg.get_payload()
    assert isinstance(payload, list)
    assert "does not send delivery notices" in " ".join(payload[0].get_content().split())


def _global_status(data: bytes) -> list[dict[str, str]]:
    """The field blocks of message/global-delivery-status, read as UTF-8 text."""
    body = data.split(b"Content-Type: message/global-delivery-status", 1)[1]
    body = body.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    blocks = []
    for block in body.decode("utf-8").split("\r\n\r\n"):
        fields = email.message_from_string(block, policy=email.policy.compat32)
        blocks.append(dict(fields.items()))
    return blocks


def test_utf8_recipient_of_a_smtputf8_message_gets_global_types() -> None:
    notice = RecipientNotice("jörg@bücher.example", "failed", Reply(550, "5.1.1 unknown"),
                             original_recipient=("utf-8", "Jörg+x@bücher.example"))
    original = "From: jörg@bücher.example\r\nSubject: grüße\r\n\r\nbody\r\n".encode()
    dsn = build([notice], original=original, smtputf8=True)
    assert (dsn.smtputf8, dsn.eightbit) == (True, True)
    msg = email.message_from_bytes(dsn.data, policy=email.policy.compat32)
    assert types(msg) == ["text/plain", "message/global-delivery-status",
                          "message/global-headers"]
    _, rcpt = _global_status(dsn.data)
    assert rcpt["Final-Recipient"] == "utf-8; jörg@bücher.example"
    assert rcpt["Original-Recipient"] == "utf-8; Jörg\\x{2B}x@bücher.example"
    assert rcpt["Action"] == "failed"
    headers = dsn.data.split(b"Content-Type: message/global-headers\r\n", 1)[1]
    assert "Subject: grüße\r\n".encode() in headers
    assert b"\r\nbody\r\n" not in headers


def test_utf8_original_returned_whole_is_message_global() -> None:
    notice = RecipientNotice("jörg@bücher.example", "failed", Reply(550, "5.1.1 unknown"))
    original = "Subject: grüße\r\n\r\nbödy\r\n".encode()
    dsn = build([notice], original=original, smtputf8=True, ret="FULL")
    msg = email.message_from_bytes(dsn.data, policy=email.policy.compat32)
    assert types(msg)[1:] == ["message/global-delivery-status", "message/global"]
    assert dsn.data.endswith(b"\r\n\r\n" + original + b"\r\n--=_dsn_D1--\r\n")


def test_without_smtputf8_a_utf8_recipient_keeps_the_7bit_report() -> None:
    notice = RecipientNotice("jörg@bücher.example", "failed", Reply(550, "5.1.1 unknown"))
    dsn = build([notice])
    assert dsn.data.isascii()
    assert types(parse(dsn.data))[1] == "message/delivery-status"
