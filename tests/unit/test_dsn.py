"""relay.delivery.dsn: the DSN bytes parse back, to the stdlib and to an independent DSN parser."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message
from email.utils import parseaddr, parsedate_to_datetime

import pytest
from flufl.bounce import all_failures, scan_message
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.model import Reply
from relay.delivery.dsn import Action, Dsn, RecipientNotice, build_dsn

ARRIVAL = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
NOW = ARRIVAL + timedelta(days=5)
ORIGINAL_HEADERS = (
    b"Return-Path: <alice@example.org>\r\n"
    b"Received: from client.example.org (client.example.org [198.51.100.7])\r\n"
    b"\tby mx2.example.net with ESMTP id 01HXQ\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com, carol@example.com, dave@example.com, erin@example.com\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <m1@example.org>\r\n"
)
ORIGINAL = ORIGINAL_HEADERS + b"\r\nThe secret body.\r\n"

BOB = RecipientNotice(
    address="bob@example.com",
    action="failed",
    reply=Reply(550, "5.1.1 <bob@example.com>: Recipient address rejected: User unknown"),
    remote_mta="mx.example.com",
    last_attempt=NOW,
)
CAROL = RecipientNotice(
    address="carol@example.com",
    action="failed",
    reply=Reply(451, "4.4.1 connect to mx.example.com[192.0.2.1]:25: Connection refused"),
    remote_mta=None,
    last_attempt=NOW - timedelta(minutes=30),
)
DAVE = RecipientNotice(
    address="dave@example.com",
    action="delayed",
    reply=Reply(452, "4.2.2 Mailbox full"),
    remote_mta="mx.example.com[192.0.2.1]:25",
    last_attempt=NOW,
    will_retry_until=ARRIVAL + timedelta(days=5),
)


def build(
    notices: list[RecipientNotice],
    *,
    original: bytes = ORIGINAL,
    sender: str = "alice@example.org",
    dsn_id: str = "01HXDSN0000000000000000000",
) -> Dsn:
    return build_dsn(
        reporting_mta="mx2.example.net",
        original_sender=sender,
        queue_id="01HXQUEUE00000000000000000",
        dsn_id=dsn_id,
        arrival=ARRIVAL,
        now=NOW,
        notices=notices,
        original=original,
    )


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.default)


def parts(msg: Message) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def status_blocks(msg: Message) -> list[Message]:
    """The message/delivery-status field blocks: per-message first, then per recipient."""
    (report,) = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return blocks


def assert_wire_format(data: bytes) -> None:
    """CRLF line endings only, and no line longer than 998 octets (RFC 5322 2.1.1)."""
    assert data.endswith(b"\r\n")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def exact_fields(data: bytes) -> list[dict[str, str]]:
    """The delivery-status blocks as exact unfolded strings (compat32 does no decoding)."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [
        {name.lower(): unfold(value) for name, value in block.items()}
        for block in status_blocks(msg)
    ]


def xtext_decode(value: str) -> str:
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m[1], 16)), value)


# -- structure ----------------------------------------------------------------


def test_bounce_is_a_multipart_report_with_three_parts() -> None:
    dsn = build([BOB, CAROL])
    assert_wire_format(dsn.data)
    assert dsn.data.isascii()
    assert (dsn.smtputf8, dsn.eightbit) == (False, False)
    msg = parse(dsn.data)
    assert msg.defects == []
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert all(p.defects == [] for p in msg.walk())


def test_top_level_headers() -> None:
    dsn = build([BOB])
    header_section = dsn.data.split(b"\r\n\r\n", 1)[0]
    assert header_section.isascii()
    msg = parse(dsn.data)
    assert parseaddr(msg["From"]) == ("Mail Delivery System", "MAILER-DAEMON@mx2.example.net")
    assert parseaddr(msg["To"])[1] == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsedate_to_datetime(msg["Date"]) == NOW
    assert msg["Message-ID"] == "<01HXDSN0000000000000000000@mx2.example.net>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"


def test_delivery_status_fields() -> None:
    msg = parse(build([BOB, CAROL]).data)
    per_message, bob, carol = status_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; mx2.example.net"
    assert per_message["X-Queue-ID"] == "01HXQUEUE00000000000000000"
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL

    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.com"
    assert bob["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown"
    )
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]) == NOW
    assert bob["Will-Retry-Until"] is None

    # A local failure that outlived the queue: class 5, no Remote-MTA, not an smtp diagnostic.
    assert carol["Final-Recipient"] == "rfc822; carol@example.com"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "5.4.7"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == (
        "X-mx-relay; 451 4.4.1 connect to mx.example.com[192.0.2.1]:25: Connection refused"
    )
    assert parsedate_to_datetime(carol["Last-Attempt-Date"]) == NOW - timedelta(minutes=30)


def test_human_part_lists_each_recipient_and_its_reply() -> None:
    msg = parse(build([BOB, CAROL]).data)
    text = parts(msg)[0].get_content()
    assert "This is the mail system at host mx2.example.net." in text
    assert "could not be delivered" in text
    flat = " ".join(text.split())
    assert "<bob@example.com>: host mx.example.com said: 550 5.1.1" in flat
    assert "<carol@example.com>:" in flat
    assert "Connection refused" in flat


def test_header_part_is_the_original_header_section_unchanged() -> None:
    dsn = build([BOB])
    headers = parts(parse(dsn.data))[2]
    assert headers.get("Content-Transfer-Encoding") is None
    assert headers.get_payload(decode=True) == ORIGINAL_HEADERS
    assert b"secret body" not in dsn.data


def test_output_is_deterministic() -> None:
    assert build([BOB, CAROL]).data == build([BOB, CAROL]).data


# -- an independent DSN parser ------------------------------------------------


@pytest.mark.parametrize("policy", [email.policy.compat32, email.policy.default])
def test_flufl_bounce_finds_the_failed_recipients(policy: email.policy.Policy) -> None:
    msg = email.message_from_bytes(build([BOB, CAROL]).data, policy=policy)
    assert scan_message(msg) == {b"bob@example.com", b"carol@example.com"}
    assert all_failures(msg) == (frozenset(), {b"bob@example.com", b"carol@example.com"})


def test_flufl_bounce_treats_delayed_as_temporary() -> None:
    msg = email.message_from_bytes(build([DAVE]).data)
    assert scan_message(msg) == frozenset()
    assert all_failures(msg) == ({b"dave@example.com"}, frozenset())


def test_flufl_bounce_sorts_a_mixed_report() -> None:
    msg = email.message_from_bytes(build([BOB, DAVE]).data)
    assert all_failures(msg) == ({b"dave@example.com"}, {b"bob@example.com"})


# -- partial and delayed ------------------------------------------------------


def test_partial_bounce_reports_only_the_given_recipients() -> None:
    erin = RecipientNotice(
        "erin@example.com", "failed", Reply(550, "5.7.1 Relaying denied"), "mx.example.com"
    )
    msg = parse(build([BOB, erin]).data)
    blocks = status_blocks(msg)[1:]
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; bob@example.com",
        "rfc822; erin@example.com",
    ]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.7.1"]
    text = parts(msg)[0].get_content()
    assert "bob@example.com" in text and "erin@example.com" in text
    assert "carol@" not in text and "dave@" not in text
    assert scan_message(email.message_from_bytes(build([BOB, erin]).data)) == {
        b"bob@example.com",
        b"erin@example.com",
    }


def test_delay_warning() -> None:
    dsn = build([DAVE])
    assert_wire_format(dsn.data)
    msg = parse(dsn.data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, dave = status_blocks(msg)
    assert dave["Final-Recipient"] == "rfc822; dave@example.com"
    assert dave["Action"] == "delayed"
    assert dave["Status"] == "4.2.2"
    assert dave["Remote-MTA"] == "dns; mx.example.com"  # "host[ip]:port" keeps the host
    assert dave["Diagnostic-Code"] == "smtp; 452 4.2.2 Mailbox full"
    assert parsedate_to_datetime(dave["Will-Retry-Until"]) == ARRIVAL + timedelta(days=5)
    text = parts(msg)[0].get_content()
    assert "warning only" in text
    assert "could not be delivered" not in text


@pytest.mark.parametrize(
    ("action", "reply", "status"),
    [
        ("failed", Reply(550, "5.1.1 User unknown"), "5.1.1"),
        ("failed", Reply(550, "User unknown"), "5.0.0"),
        ("failed", Reply(554, "4.7.1 inconsistent remote"), "5.7.1"),
        ("failed", Reply(451, "4.4.1 connect to x: Connection refused"), "5.4.7"),
        ("failed", Reply(421, "Service not available"), "5.4.7"),
        ("failed", Reply(550, "5.\u00b9.1 Unicode digit"), "5.0.0"),
        ("delayed", Reply(451, "4.3.0 try later"), "4.3.0"),
        ("delayed", Reply(450, "try later"), "4.0.0"),
        ("delayed", Reply(550, "5.1.1 treated as soft"), "4.1.1"),
        ("delayed", Reply(250, "2.0.0 odd"), "4.0.0"),
    ],
)
def test_status_class_follows_the_action(action: Action, reply: Reply, status: str) -> None:
    notice = RecipientNotice("x@example.com", action, reply, "mx.example.com")
    _, block = status_blocks(parse(build([notice]).data))
    assert block["Status"] == status


# -- odd inputs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        # No header/body separator at all: the whole message is its header section.
        (b"From: a@example.org\r\nSubject: hi", b"From: a@example.org\r\nSubject: hi\r\n"),
        # Bare LF line endings: split the same way, returned in CRLF form.
        (
            b"From: a@example.org\nSubject: hi\n\nSECRET\n",
            b"From: a@example.org\r\nSubject: hi\r\n",
        ),
        # No headers: nothing of the body is returned.
        (b"SECRET line\r\nSubject: SECRET\r\n", b""),
        # A line that is neither a field nor a continuation ends the section.
        (b"From: a@example.org\r\nSECRET\r\nTo: SECRET", b"From: a@example.org\r\n"),
        (b"", b""),
        (b"\r\n\r\nSECRET", b""),
    ],
)
def test_header_section_of_odd_originals(original: bytes, expected: bytes) -> None:
    dsn = build([BOB], original=original)
    assert_wire_format(dsn.data)
    msg = parse(dsn.data)
    assert len(parts(msg)) == 3
    assert (parts(msg)[2].get_payload(decode=True) or b"") == expected
    assert b"SECRET" not in dsn.data


def test_8bit_utf8_headers_go_quoted_printable_and_keep_their_bytes() -> None:
    headers = "From: José <jose@example.org>\r\nSubject: Grüße aus Köln\r\n".encode()
    dsn = build([BOB], original=headers + b"\r\nbody\r\n")
    assert_wire_format(dsn.data)
    assert dsn.data.isascii()  # still a 7-bit DSN: no 8BITMIME needed
    assert (dsn.smtputf8, dsn.eightbit) == (False, False)
    part = parts(parse(dsn.data))[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content_charset() == "utf-8"
    assert part.get_payload(decode=True) == headers
    assert "Grüße aus Köln" in part.get_content()


def test_8bit_headers_that_are_not_utf8_keep_their_bytes() -> None:
    headers = b"From: a@example.org\r\nSubject: caf\xe9 cr\xe8me\r\n"
    dsn = build([BOB], original=headers + b"\r\nbody\r\n")
    assert_wire_format(dsn.data)
    assert dsn.data.isascii()
    part = parts(parse(dsn.data))[2]
    assert part.get_content_charset() is None
    assert part.get_payload(decode=True) == headers


def test_2000_character_header_line() -> None:
    headers = (
        b"From: a@example.org\r\nX-Long: "
        + b"x" * 2000
        + b"\r\nX-Spaced: "
        + b"ab " * 700
        + b"\r\n"
    )
    dsn = build([BOB], original=headers + b"\r\nbody\r\n")
    assert_wire_format(dsn.data)
    part = parts(parse(dsn.data))[2]
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True) == headers


def test_long_reply_text_is_folded_without_losing_anything() -> None:
    words = " ".join(f"word{i}" for i in range(600))
    notice = RecipientNotice(
        "x@example.com", "failed", Reply(550, f"5.0.0 {words}"), "mx.example.com"
    )
    dsn = build([notice])
    assert_wire_format(dsn.data)
    assert max(len(line) for line in dsn.data.split(b"\r\n")) <= 78
    assert exact_fields(dsn.data)[1]["diagnostic-code"] == f"smtp; 550 5.0.0 {words}"


def test_an_unbreakable_reply_still_fits_998_octets() -> None:
    notice = RecipientNotice(
        "x@example.com", "failed", Reply(550, "5.0.0 " + "y" * 5000), "mx.example.com"
    )
    dsn = build([notice])
    assert_wire_format(dsn.data)
    assert len(parts(parse(dsn.data))) == 3


def test_reply_text_cannot_inject_fields() -> None:
    notice = RecipientNotice(
        "x@example.com",
        "failed",
        Reply(550, "5.1.1 nope\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; evil@x"),
        "mx.example.com",
    )
    dsn = build([notice])
    assert_wire_format(dsn.data)
    blocks = status_blocks(parse(dsn.data))
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Final-Recipient"] == "rfc822; x@example.com"
    assert scan_message(email.message_from_bytes(dsn.data)) == {b"x@example.com"}


def test_non_ascii_recipient_uses_the_utf8_address_type() -> None:
    notice = RecipientNotice("jörg+tag@bücher.example", "failed", Reply(550, "5.1.1 unknown"))
    dsn = build([notice])
    assert dsn.data.isascii()
    field = exact_fields(dsn.data)[1]["final-recipient"]
    assert field == "utf-8; j\\x{F6}rg\\x{2B}tag@b\\x{FC}cher.example"
    assert xtext_decode(field.removeprefix("utf-8; ")) == "jörg+tag@bücher.example"
    text = parts(parse(dsn.data))[0]
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "<jörg+tag@bücher.example>" in text.get_content()


def test_internationalized_sender_needs_smtputf8() -> None:
    dsn = build([BOB], sender="jörg@bücher.example")
    assert (dsn.smtputf8, dsn.eightbit) == (True, True)
    assert_wire_format(dsn.data)
    # Only the To: field carries 8-bit octets; everything after the header section is 7-bit.
    head, body = dsn.data.split(b"\r\n\r\n", 1)
    assert body.isascii()
    assert "To: <jörg@bücher.example>".encode() in head


def test_boundary_never_occurs_in_the_content() -> None:
    dsn_id = "01HXDSN0000000000000000000"
    hostile = f"From: a@example.org\r\nX-Trap: --=_dsn_{dsn_id}--\r\n\r\n".encode()
    dsn = build([BOB], original=hostile, dsn_id=dsn_id)
    msg = parse(dsn.data)
    assert len(parts(msg)) == 3
    assert parts(msg)[2].get_payload(decode=True) == hostile[:-2]


@pytest.mark.parametrize(
    "change",
    [
        {"original_sender": ""},
        {"original_sender": "a@b\r\nBcc: x@y"},
        {"reporting_mta": "mx2.example.net\r\nX: y"},
        {"reporting_mta": ""},
        {"dsn_id": "a b"},
        {"dsn_id": "a..b"},
        {"reporting_mta": "mx2.example.net."},
        {"queue_id": "q<1>"},
        {"now": datetime(2024, 1, 1)},
        {"arrival": datetime(2024, 1, 1)},
        {"notices": []},
        {"notices": [RecipientNotice("x@y", "delivered", Reply(250, "ok"))]},  # type: ignore[arg-type]
        {
            "notices": [
                RecipientNotice("x@y", "failed", Reply(550, "no"), None, datetime(2024, 1, 1))
            ]
        },
    ],
)
def test_refuses_inputs_that_would_make_a_bad_dsn(change: dict[str, object]) -> None:
    kwargs: dict[str, object] = {
        "reporting_mta": "mx2.example.net",
        "original_sender": "alice@example.org",
        "queue_id": "Q1",
        "dsn_id": "D1",
        "arrival": ARRIVAL,
        "now": NOW,
        "notices": [BOB],
        "original": ORIGINAL,
    } | change
    with pytest.raises(ValueError):
        build_dsn(**kwargs)  # type: ignore[arg-type]


def test_other_time_zones_are_kept() -> None:
    cet = timezone(timedelta(hours=1))
    dsn = build_dsn(
        reporting_mta="mx2.example.net",
        original_sender="alice@example.org",
        queue_id="Q1",
        dsn_id="D1",
        arrival=ARRIVAL.astimezone(cet),
        now=NOW.astimezone(cet),
        notices=[BOB],
        original=ORIGINAL,
    )
    msg = parse(dsn.data)
    assert msg["Date"].endswith("+0100")
    assert parsedate_to_datetime(msg["Date"]) == NOW


# -- property -----------------------------------------------------------------

printable = st.characters(exclude_categories=("Cc", "Cs"))
notices_strategy = st.lists(
    st.builds(
        RecipientNotice,
        address=st.text(min_size=1, max_size=80),
        action=st.sampled_from(["failed", "delayed"]),
        reply=st.builds(Reply, code=st.integers(200, 599), text=st.text(max_size=1500)),
        remote_mta=st.none() | st.text(max_size=60) | st.just("mx.example.com[192.0.2.1]:25"),
        last_attempt=st.none() | st.just(NOW),
        will_retry_until=st.none() | st.just(NOW + timedelta(days=1)),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(
    notices=notices_strategy,
    sender=st.text(printable, min_size=1, max_size=100),
    original=st.binary(max_size=3000)
    | st.lists(
        st.sampled_from(
            [b"Subject: ", b"x" * 1200, b"\xc3\xa9", b" ", b"\r\n", b"\n", b"\r", b"\t"]
        ),
        max_size=30,
    ).map(b"From: a@b\r\n".join),
)
def test_any_input_makes_a_well_formed_dsn(
    notices: list[RecipientNotice], sender: str, original: bytes
) -> None:
    dsn = build(notices, original=original, sender=sender)
    assert_wire_format(dsn.data)
    assert dsn.smtputf8 == (not sender.isascii())
    assert dsn.eightbit == (not dsn.data.isascii())
    assert dsn.data.split(b"\r\n\r\n", 1)[1].isascii()

    msg = parse(dsn.data)
    assert msg.get_content_type() == "multipart/report"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    parts(msg)[0].get_content()  # the human part decodes

    fields = exact_fields(dsn.data)
    assert len(fields) == len(notices) + 1
    for notice, block in zip(notices, fields[1:], strict=True):
        assert block["action"] == notice.action
        assert block["status"][0] == ("5" if notice.action == "failed" else "4")
        assert re.fullmatch(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", block["status"])
        kind, _, value = block["final-recipient"].partition("; ")
        assert kind in ("rfc822", "utf-8")
        assert (value if kind == "rfc822" else xtext_decode(value)) == notice.address
        assert block["diagnostic-code"].startswith(("smtp; ", "X-mx-relay; "))
        assert block["diagnostic-code"].isascii()

    # The returned headers are a leading run of the original's lines, in CRLF form.
    returned = parts(msg)[2].get_payload(decode=True) or b""
    returned_lines = returned.split(b"\r\n")[:-1] if returned else []
    assert returned_lines == re.split(rb"\r\n|\r|\n", original)[: len(returned_lines)]
