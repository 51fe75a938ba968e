"""decide() and delay_notice() with RFC 3461 parameters: NOTIFY picks which
DSNs are queued, `relayed` goes out for a hop without DSN, RET/ENVID/ORCPT
reach the report."""

from __future__ import annotations

import email
import email.policy
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest

from relay.core.dsnparams import NO_MAIL_PARAMS, MailParams, RcptParams
from relay.core.model import DeliveryReport, RecipientStatus, Reply
from relay.delivery.backoff import BackoffPolicy
from relay.delivery.outcomes import Rules, decide, delay_notice
from relay.queue.rows import Claimed, PendingRecipient

T0 = datetime(2026, 5, 1, tzinfo=UTC)
ORIGINAL = b"Subject: hello\r\n\r\nbody\r\n"
OK = Reply(250, "2.0.0 Ok")
BUSY = Reply(450, "4.2.1 mailbox busy")
UNKNOWN = Reply(550, "5.1.1 user unknown")


def rules() -> Rules:
    ids = count(1)
    return Rules(hostname="mail.verrotech.net",
                 backoff=BackoffPolicy(min_backoff=300, max_backoff=3600, max_lifetime=86400),
                 delay_warning=600, new_id=lambda: f"DSN{next(ids)}", rng=random.Random(0))


def claimed(*rcpts: tuple[str, RcptParams], dsn: MailParams = NO_MAIL_PARAMS) -> Claimed:
    return Claimed(
        id="Q1", body_id="Q1", destination="verrotech.com", sender="s@sender.example", size=10,
        received_at=T0, smtputf8=False, eightbit=False, is_dsn=False, attempts=0,
        delay_warned=False, lease_until=T0 + timedelta(days=3), dsn=dsn,
        recipients=tuple(PendingRecipient(i, f"{a}@verrotech.com", RecipientStatus.QUEUED, 0, p)
                         for i, (a, p) in enumerate(rcpts, start=1)),
    )


def report(hop_dsn: bool = False, **replies: Reply) -> DeliveryReport:
    return DeliveryReport(replies={f"{k}@verrotech.com": v for k, v in replies.items()},
                          remote_host="mx.verrotech.com[127.0.0.2]:25", hop_dsn=hop_dsn)


def actions(data: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    (status,) = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [(b["Final-Recipient"], b["Action"]) for b in blocks[1:]]


NEVER = RcptParams(("NEVER",))
SUCCESS = RcptParams(("SUCCESS",))
DEFAULT = RcptParams()


@pytest.mark.parametrize(("params", "bounced"), [
    (DEFAULT, True), (RcptParams(("FAILURE",)), True), (NEVER, False), (SUCCESS, False),
    (RcptParams(("DELAY",)), False), (RcptParams(("SUCCESS", "FAILURE")), True),
])
def test_failure_dsn_follows_notify(params: RcptParams, bounced: bool) -> None:
    d = decide(rules(), claimed(("a", params)), "n", T0, report=report(a=UNKNOWN),
               original=ORIGINAL)
    assert [actions(m.data) for m in d.attempt.dsns] == (
        [[("rfc822; a@verrotech.com", "failed")]] if bounced else [])


def test_failure_dsn_names_only_those_that_asked() -> None:
    d = decide(rules(), claimed(("a", NEVER), ("b", DEFAULT)), "n", T0,
               report=report(a=UNKNOWN, b=UNKNOWN), original=ORIGINAL)
    [dsn] = d.attempt.dsns
    assert actions(dsn.data) == [("rfc822; b@verrotech.com", "failed")]


@pytest.mark.parametrize(("params", "warned"), [
    (DEFAULT, True), (RcptParams(("DELAY",)), True), (NEVER, False),
    (RcptParams(("FAILURE",)), False),
])
def test_delay_dsn_follows_notify(params: RcptParams, warned: bool) -> None:
    later = T0 + timedelta(hours=1)
    d = decide(rules(), claimed(("a", params)), "n", later, report=report(a=BUSY),
               original=ORIGINAL)
    assert len(d.attempt.dsns) == int(warned)
    assert d.attempt.delay_warned  # asked or not: the sweep need not look again
    notice = delay_notice(rules(), claimed(("a", params)), "n", later, ORIGINAL)
    assert len(notice.dsns) == int(warned) and notice.delay_warned


def test_success_to_a_hop_without_dsn_is_reported_relayed() -> None:
    d = decide(rules(), claimed(("a", SUCCESS), ("b", DEFAULT)), "n", T0,
               report=report(a=OK, b=OK), original=ORIGINAL)
    [dsn] = d.attempt.dsns
    assert dsn.sender == "" and dsn.recipients == ("s@sender.example",) and dsn.is_dsn
    assert actions(dsn.data) == [("rfc822; a@verrotech.com", "relayed")]


def test_success_to_a_hop_with_dsn_is_its_business() -> None:
    d = decide(rules(), claimed(("a", SUCCESS)), "n", T0, report=report(hop_dsn=True, a=OK),
               original=ORIGINAL)
    assert d.attempt.dsns == ()


def test_envid_ret_and_orcpt_reach_the_report() -> None:
    message = claimed(("a", RcptParams(None, "rfc822;A+2Bx@verrotech.com")),
                      dsn=MailParams("FULL", "id+2042"))
    d = decide(rules(), message, "n", T0, report=report(a=UNKNOWN), original=ORIGINAL)
    [dsn] = d.attempt.dsns
    assert b"Original-Envelope-Id: id 42\r\n" in dsn.data
    assert b"Original-Recipient: rfc822; A+x@verrotech.com\r\n" in dsn.data
    assert b"Content-Type: message/rfc822\r\n" in dsn.data and b"\r\nbody\r\n" in dsn.data
    hdrs = replace(message, dsn=MailParams("HDRS"))
    [dsn] = decide(rules(), hdrs, "n", T0, report=report(a=UNKNOWN), original=ORIGINAL
                   ).attempt.dsns
    assert b"Content-Type: text/rfc822-headers" in dsn.data and b"\r\nbody\r\n" not in dsn.data
