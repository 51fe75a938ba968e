"""Decisions as tables: one attempt's replies -> recipient statuses, retry time, DSNs."""

import email
import email.policy
import random
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest

from relay.core.destination import AttemptOutcome
from relay.core.model import (
    DeliveryReport,
    MessageState,
    Outcome,
    RecipientStatus,
    Reply,
    message_may_become,
    recipient_may_become,
)
from relay.delivery.backoff import BackoffPolicy
from relay.delivery.outcomes import Rules, decide
from relay.delivery.resolver import NoRoute
from relay.queue.rows import Claimed, PendingRecipient

T0 = datetime(2026, 5, 1, tzinfo=UTC)
LEASE = T0 + timedelta(days=3)  # the claim's lease, carried into its Attempt
ORIGINAL = b"Subject: hello\r\nMessage-ID: <m1@sender.example>\r\n\r\nbody\r\n"


def rules(delay_warning: float = 0) -> Rules:
    ids = count(1)
    return Rules(
        hostname="mail.verrotech.net",
        backoff=BackoffPolicy(min_backoff=300, max_backoff=3600, max_lifetime=86400),
        delay_warning=delay_warning,
        new_id=lambda: f"DSN{next(ids)}",
        rng=random.Random(0),
    )


def claimed(
    *addresses: str,
    sender: str = "s@sender.example",
    attempts: int = 0,
    received: datetime = T0,
    is_dsn: bool = False,
    warned: bool = False,
) -> Claimed:
    return Claimed(
        id="Q1",
        body_id="Q1",
        destination="verrotech.com",
        sender=sender,
        size=10,
        received_at=received,
        smtputf8=False,
        eightbit=False,
        is_dsn=is_dsn,
        attempts=attempts,
        delay_warned=warned,
        lease_until=LEASE,
        recipients=tuple(
            PendingRecipient(i, a, RecipientStatus.QUEUED, attempts)
            for i, a in enumerate(addresses, start=1)
        ),
    )


def report(site_failure: bool = False, **replies: Reply) -> DeliveryReport:
    return DeliveryReport(
        replies={f"{k}@verrotech.com": v for k, v in replies.items()},
        remote_host="mail.verrotech.com[127.0.0.2]:25",
        site_failure=site_failure,
    )


OK = Reply(250, "2.0.0 Ok")
BUSY = Reply(450, "4.2.1 mailbox busy")
UNKNOWN = Reply(550, "5.1.1 user unknown")
REFUSED = Reply(451, "4.4.1 connect to mail.verrotech.com[127.0.0.2]:25: Connection refused")


@pytest.mark.parametrize(
    ("reply", "status", "outcome"),
    [
        (OK, RecipientStatus.DELIVERED, "delivered"),
        (BUSY, RecipientStatus.DEFERRED, "deferred"),
        (UNKNOWN, RecipientStatus.BOUNCED, "bounced"),
        (Reply(421, "4.7.0 try later"), RecipientStatus.DEFERRED, "deferred"),
        (Reply(554, "5.7.1 rejected"), RecipientStatus.BOUNCED, "bounced"),
    ],
)
def test_reply_class_decides_recipient(reply: Reply, status: RecipientStatus, outcome: str) -> None:
    d = decide(
        rules(), claimed("a@verrotech.com"), "n", T0, report=report(a=reply), original=ORIGINAL
    )
    [update] = d.attempt.recipients
    assert (update.status, update.outcome) == (status, outcome)


def test_partial_outcome_one_message() -> None:
    d = decide(
        rules(),
        claimed("a@verrotech.com", "b@verrotech.com", "c@verrotech.com"),
        "n",
        T0 + timedelta(seconds=5),
        report=report(a=OK, b=BUSY, c=UNKNOWN),
        original=ORIGINAL,
    )
    assert [u.status for u in d.attempt.recipients] == [
        RecipientStatus.DELIVERED,
        RecipientStatus.DEFERRED,
        RecipientStatus.BOUNCED,
    ]
    # retried after min_backoff (+-10 % jitter), destination is up
    wait = (d.attempt.next_attempt_at - (T0 + timedelta(seconds=5))).total_seconds()
    assert 270 <= wait <= 330
    assert d.attempt.destination is not None
    assert d.attempt.destination.outcome is AttemptOutcome.DEFERRED  # reached: up
    assert (d.attempt.owner, d.attempt.lease_until) == ("n", LEASE)  # the claim's lease
    [dsn] = d.attempt.dsns
    assert dsn.sender == "" and dsn.recipients == ("s@sender.example",) and dsn.is_dsn
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert b"Final-Recipient: rfc822; c@verrotech.com" in dsn.data
    assert (
        b"a@verrotech.com"
        not in dsn.data.split(b"message/delivery-status")[1].split(b"text/rfc822-headers")[0]
    )


@pytest.mark.parametrize(
    ("attempts", "low", "high"),
    [(0, 270, 330), (1, 540, 660), (2, 1080, 1320), (4, 3240, 3960), (20, 3240, 3960)],
)
def test_backoff_grows_with_attempts(attempts: int, low: float, high: float) -> None:
    d = decide(
        rules(),
        claimed("a@verrotech.com", attempts=attempts),
        "n",
        T0,
        report=report(a=BUSY),
        original=ORIGINAL,
    )
    wait = (d.attempt.next_attempt_at - T0).total_seconds()
    assert low <= wait <= high


def test_site_failure_marks_destination_down_and_parks() -> None:
    d = decide(
        rules(),
        claimed("a@verrotech.com"),
        "n",
        T0,
        report=report(site_failure=True, a=REFUSED),
        original=ORIGINAL,
        destination_failures=2,
    )
    assert d.outcome is AttemptOutcome.SITE_FAILURE
    assert d.attempt.next_attempt_at is None  # parked: the destination decides
    dest = d.attempt.destination
    assert dest is not None and dest.outcome is AttemptOutcome.SITE_FAILURE
    assert 1080 <= (dest.retry_at - T0).total_seconds() <= 1320  # third failure: 4 x min
    assert d.attempt.recipients[0].status is RecipientStatus.DEFERRED
    assert d.attempt.dsns == ()


def test_temporary_dns_failure_is_a_site_failure() -> None:
    d = decide(
        rules(),
        claimed("a@verrotech.com"),
        "n",
        T0,
        report=NoRoute(False, "mail for verrotech.com loops back to myself", "4.4.6"),
        original=ORIGINAL,
    )
    assert d.outcome is AttemptOutcome.SITE_FAILURE
    assert "loops back to myself" in d.attempt.last_error


def test_permanent_route_failure_bounces() -> None:
    d = decide(
        rules(),
        claimed("a@nx.example"),
        "n",
        T0,
        report=NoRoute(True, "Host or domain name not found", "5.1.2"),
        original=ORIGINAL,
    )
    assert d.attempt.recipients[0].status is RecipientStatus.BOUNCED
    assert d.outcome is AttemptOutcome.UNROUTABLE  # says nothing of the hosts
    assert b"Status: 5.1.2" in d.attempt.dsns[0].data


def test_temporary_failure_past_lifetime_bounces_as_expired() -> None:
    d = decide(
        rules(),
        claimed("a@verrotech.com"),
        "n",
        T0 + timedelta(days=1),
        report=report(a=BUSY),
        original=ORIGINAL,
    )
    [update] = d.attempt.recipients
    assert update.status is RecipientStatus.BOUNCED and update.outcome is Outcome.EXPIRED
    assert b"Status: 5.4.7" in d.attempt.dsns[0].data or b"Status: 5.2.1" in d.attempt.dsns[0].data


def test_expired_without_attempt() -> None:
    d = decide(
        rules(),
        claimed("a@verrotech.com"),
        "n",
        T0 + timedelta(days=2),
        report=None,
        original=ORIGINAL,
    )
    assert d.attempt.recipients[0].outcome is Outcome.EXPIRED
    assert d.outcome is AttemptOutcome.EXPIRED
    assert not d.attempt.counted
    assert b"Status: 5.4.7" in d.attempt.dsns[0].data


@pytest.mark.parametrize(("sender", "is_dsn"), [("", True), ("", False)])
def test_no_dsn_for_null_sender(sender: str, is_dsn: bool) -> None:
    d = decide(
        rules(),
        claimed("a@verrotech.com", sender=sender, is_dsn=is_dsn),
        "n",
        T0,
        report=report(a=UNKNOWN),
        original=ORIGINAL,
    )
    assert d.attempt.recipients[0].status is RecipientStatus.BOUNCED
    assert d.attempt.dsns == ()


@pytest.mark.parametrize(
    ("delay_warning", "age", "warned", "expect"),
    [
        (0, 7200, False, False),
        (3600, 1800, False, False),
        (3600, 3600, False, True),
        (3600, 7200, True, False),
    ],
)
def test_delay_warning(delay_warning: float, age: float, warned: bool, expect: bool) -> None:
    d = decide(
        rules(delay_warning),
        claimed("a@verrotech.com", warned=warned),
        "n",
        T0 + timedelta(seconds=age),
        report=report(a=BUSY),
        original=ORIGINAL,
    )
    assert d.attempt.delay_warned is expect
    assert len(d.attempt.dsns) == int(expect)
    if expect:
        assert b"Action: delayed" in d.attempt.dsns[0].data


def test_operator_bounce() -> None:
    d = decide(
        rules(),
        claimed("a@verrotech.com"),
        "n",
        T0,
        report=None,
        original=ORIGINAL,
        operator_bounce=True,
    )
    assert d.attempt.recipients[0].status is RecipientStatus.BOUNCED
    assert [r[1] for r in d.results] == [Outcome.BOUNCED]
    assert len(d.attempt.dsns) == 1


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        (RecipientStatus.QUEUED, RecipientStatus.DELIVERED, True),
        (RecipientStatus.QUEUED, RecipientStatus.DEFERRED, True),
        (RecipientStatus.QUEUED, RecipientStatus.BOUNCED, True),
        (RecipientStatus.DEFERRED, RecipientStatus.DEFERRED, True),
        (RecipientStatus.DEFERRED, RecipientStatus.DELIVERED, True),
        (RecipientStatus.DELIVERED, RecipientStatus.DEFERRED, False),
        (RecipientStatus.DELIVERED, RecipientStatus.BOUNCED, False),
        (RecipientStatus.BOUNCED, RecipientStatus.DELIVERED, False),
        (RecipientStatus.DEFERRED, RecipientStatus.QUEUED, False),
    ],
)
def test_recipient_transitions(
    current: RecipientStatus, new: RecipientStatus, allowed: bool
) -> None:
    assert recipient_may_become(current, new) is allowed


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        (MessageState.DEFERRED, MessageState.ACTIVE, True),
        (MessageState.ACTIVE, MessageState.DEFERRED, True),
        (MessageState.DEFERRED, MessageState.HOLD, True),
        (MessageState.HOLD, MessageState.DEFERRED, True),
        (MessageState.HOLD, MessageState.ACTIVE, False),
        (MessageState.ACTIVE, MessageState.ACTIVE, False),
    ],
)
def test_message_transitions(current: MessageState, new: MessageState, allowed: bool) -> None:
    assert message_may_become(current, new) is allowed


def test_reply_enhanced_status_is_ascii_only() -> None:
    assert Reply(550, "5.1.1 x").enhanced_status == "5.1.1"
    assert Reply(550, "5.\u00b9.1 x").enhanced_status == "5.0.0"
    assert Reply(450, "busy").enhanced_status == "4.0.0"


LOST_AFTER_DOT = Reply(
    451,
    "4.4.2 lost connection with mail.verrotech.com[127.0.0.2]:25 while sending end of data"
    " -- message may be sent more than once",
    uncertain=True,
)


def test_uncertain_is_retried_like_a_deferral_and_says_so() -> None:
    d = decide(
        rules(),
        claimed("a@verrotech.com", "b@verrotech.com", attempts=2),
        "n",
        T0 + timedelta(seconds=5),
        report=report(a=LOST_AFTER_DOT, b=UNKNOWN),
        original=ORIGINAL,
    )
    a, b = d.attempt.recipients
    assert (a.status, a.outcome) == (RecipientStatus.DEFERRED, Outcome.UNCERTAIN)
    assert a.reply == f"delivery uncertain: {LOST_AFTER_DOT}"
    assert b.outcome is Outcome.BOUNCED
    assert d.attempt.next_attempt_at is not None
    assert d.attempt.next_attempt_at - (T0 + timedelta(seconds=5)) >= timedelta(seconds=600)
    assert d.attempt.last_error == a.reply
    assert ("a@verrotech.com", Outcome.UNCERTAIN, LOST_AFTER_DOT) in d.results  # the metric
    # The next hop answered up to the final dot: its destination is up, not down.
    assert d.outcome is AttemptOutcome.DEFERRED and d.outcome.reached


def test_uncertain_alone_leaves_the_destination_reached() -> None:
    d = decide(rules(), claimed("a@verrotech.com"), "n", T0,
               report=report(a=LOST_AFTER_DOT), original=ORIGINAL)
    assert d.outcome is AttemptOutcome.DEFERRED and d.outcome.reached
    assert d.attempt.destination is not None and d.attempt.destination.retry_at is None


def test_uncertain_past_lifetime_bounces_as_expired() -> None:
    d = decide(rules(), claimed("a@verrotech.com"), "n", T0 + timedelta(days=1),
               report=report(a=LOST_AFTER_DOT), original=ORIGINAL)
    [update] = d.attempt.recipients
    assert update.status is RecipientStatus.BOUNCED and update.outcome is Outcome.EXPIRED
    assert update.reply.startswith("delivery uncertain: 451 4.4.2 lost connection")
    assert len(d.attempt.dsns) == 1
