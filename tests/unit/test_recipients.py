"""Known recipients as pure rules: which replies teach what, keys, expiry, the
RCPT verdicts they give, the accept side's copy, the import file."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from relay.core import config as config_module
from relay.core.model import DeliveryReport, RecipientStatus, Reply
from relay.core.recipients import (
    KnownRecipient,
    KnownState,
    Learned,
    Source,
    Ttl,
    learned_from,
    recipient_key,
)
from relay.delivery.backoff import BackoffPolicy
from relay.delivery.outcomes import Rules, decide
from relay.delivery.resolver import NoRoute
from relay.ops.cli.recipients import ImportRefused, parse_import
from relay.queue.rows import Claimed, PendingRecipient
from relay.smtp.policy import Policy
from relay.smtp.verify import FULL_INTERVAL, OVERLAP, KnownRecipients

T0 = datetime(2026, 5, 1, tzinfo=UTC)
DAY = 86400.0


@pytest.mark.parametrize(("code", "text", "taught"), [
    (250, "2.1.5 Ok", KnownState.VALID),
    (251, "2.1.5 will forward", KnownState.VALID),
    (550, "5.1.1 <bob@x.example>: User unknown", KnownState.INVALID),
    (553, "5.1.3 bad address", KnownState.INVALID),
    (550, "5.1.10 null MX", KnownState.INVALID),
    (550, "5.7.1 relaying denied", None),  # a policy refusal, not the address
    (550, "User unknown", None),  # no enhanced code: nothing proven
    (550, "5.1.7 bad sender", None),  # about the sender
    (553, "5.1.8 bad sender's system", None),
    (450, "4.1.1 mailbox unavailable", None),  # temporary: teaches nothing
    (451, "4.3.0 try later", None),
    (452, "5.1.1 a 4xx with a 5.1.1 text", None),
])
def test_which_replies_teach_what(code: int, text: str, taught: KnownState | None) -> None:
    assert learned_from(Reply(code, text)) is taught


def test_an_address_is_known_by_its_lower_cased_local_part_and_a_label_domain() -> None:
    assert recipient_key("Bob.Smith@Bücher.Example") == "bob.smith@xn--bcher-kva.example"
    assert recipient_key("bob.smith@XN--BCHER-KVA.example.") == "bob.smith@xn--bcher-kva.example"
    assert Learned("Bob@Bücher.example", KnownState.VALID).domain == "xn--bcher-kva.example"


def test_knowledge_expires_its_states_ttl_after_last_seen() -> None:
    ttl = Ttl(valid=30 * DAY, invalid=3 * DAY)
    seen = T0
    assert not ttl.expired(KnownState.VALID, seen, seen + timedelta(days=29, hours=23))
    assert ttl.expired(KnownState.VALID, seen, seen + timedelta(days=30))
    assert not ttl.expired(KnownState.INVALID, seen, seen + timedelta(days=2, hours=23))
    assert ttl.expired(KnownState.INVALID, seen, seen + timedelta(days=3))


# -- what an attempt teaches ---------------------------------------------------

def _rules(learning: dict[str, Ttl]) -> Rules:
    return Rules(hostname="mx.example", backoff=BackoffPolicy(300, 3600, 86400),
                 delay_warning=0, new_id=lambda: "DSN1", rng=random.Random(0),
                 learning=learning)


def _claimed(*addresses: str) -> Claimed:
    return Claimed(
        id="Q1", body_id="Q1", destination="company.example", sender="s@sender.example",
        size=10, received_at=T0, smtputf8=False, eightbit=False, is_dsn=False, attempts=0,
        delay_warned=False, lease_until=T0 + timedelta(hours=1),
        recipients=tuple(PendingRecipient(i, a, RecipientStatus.QUEUED, 0)
                         for i, a in enumerate(addresses, start=1)),
    )


def test_an_attempt_of_a_verifying_domain_carries_what_its_replies_taught() -> None:
    message = _claimed("ann@company.example", "bob@company.example", "cy@company.example")
    report = DeliveryReport(replies={
        "ann@company.example": Reply(250, "2.0.0 Ok"),
        "bob@company.example": Reply(550, "5.1.1 no such user"),
        "cy@company.example": Reply(450, "4.2.1 mailbox busy"),
    }, remote_host="mx[127.0.0.1]:25")
    decision = decide(_rules({"company.example": Ttl(DAY, DAY)}), message, "me", T0,
                      report=report, original=b"x")
    assert decision.attempt.learned == (
        Learned("ann@company.example", KnownState.VALID),
        Learned("bob@company.example", KnownState.INVALID),
    )
    off = decide(_rules({}), message, "me", T0, report=report, original=b"x")
    assert off.attempt.learned == ()


def test_our_own_replies_teach_nothing() -> None:
    message = _claimed("ann@company.example")
    learning = _rules({"company.example": Ttl(DAY, DAY)})
    no_route = NoRoute(permanent=True, status="5.1.2", reason="no such domain")
    assert decide(learning, message, "me", T0, report=no_route, original=b"x").attempt.learned == ()
    expired = decide(learning, message, "me", T0 + timedelta(days=2), report=None, original=b"x")
    assert expired.attempt.learned == ()


# -- the RCPT verdict ------------------------------------------------------------

def _policy(known: KnownRecipients, counted: Counter[str], now: datetime = T0,
            **domain: object) -> Policy:
    config = config_module.from_mapping(
        {"domains": {"company.example": {"verify": "learned", **domain}}}, env={})
    return Policy(config, known=known, checked=counted.update_one, now=lambda: now)


class Counted(Counter[str]):
    def update_one(self, result: str) -> None:
        self[result] += 1


def _known(*rows: tuple[str, KnownState, datetime]) -> KnownRecipients:
    known = KnownRecipients()
    known.apply([KnownRecipient(a, recipient_key(a), "company.example", s, Source.DELIVERY,
                                seen, seen) for a, s, seen in rows], len(rows), full=True)
    return known


def test_known_invalid_is_refused_known_valid_accepted_unknown_follows_the_setting() -> None:
    known = _known(("ann@company.example", KnownState.VALID, T0),
                   ("bob@company.example", KnownState.INVALID, T0))
    counted = Counted()
    accept = _policy(known, counted)
    assert accept.check_recipient("Ann@company.example") is None
    assert str(accept.check_recipient("BOB@company.example")) == (
        "550 5.1.1 <BOB@company.example>: Recipient address rejected: User unknown")
    assert accept.check_recipient("cy@company.example") is None
    assert counted == {"valid": 1, "invalid": 1, "unknown": 1}

    tempfail = _policy(known, counted, unknown_recipient="tempfail")
    assert str(tempfail.check_recipient("cy@company.example")) == (
        "450 4.1.1 <cy@company.example>: Recipient address rejected: unverified address")
    assert tempfail.check_recipient("ann@company.example") is None


def test_expired_knowledge_is_unknown() -> None:
    known = _known(("bob@company.example", KnownState.INVALID, T0))
    counted = Counted()
    later = _policy(known, counted, now=T0 + timedelta(days=1), verify_invalid_ttl="1d",
                    unknown_recipient="tempfail")
    assert later.check_recipient("bob@company.example").code == 450  # type: ignore[union-attr]
    assert counted == {"unknown": 1}


def test_a_static_list_decides_instead_of_what_was_learned() -> None:
    known = _known(("ann@company.example", KnownState.VALID, T0),
                   ("bob@company.example", KnownState.INVALID, T0))
    counted = Counted()
    policy = _policy(known, counted, recipients=["bob"])
    assert policy.check_recipient("bob@company.example") is None
    assert policy.check_recipient("ann@company.example").code == 550  # type: ignore[union-attr]
    assert counted == {"static": 2}


def test_verify_off_consults_nothing_and_counts_nothing() -> None:
    known = _known(("bob@company.example", KnownState.INVALID, T0))
    counted = Counted()
    policy = _policy(known, counted, verify="off")
    assert policy.check_recipient("bob@company.example") is None
    assert not counted and not policy.verifies


def test_callout_is_accepted_by_the_config_and_its_timeout_must_be_positive() -> None:
    config = config_module.from_mapping(
        {"domains": {"a.example": {"verify": "callout", "verify_timeout": "2s"}}}, env={})
    assert config.domains["a.example"].verify == "callout"
    assert config.domains["a.example"].verify_timeout == 2.0
    with pytest.raises(config_module.ConfigError) as info:
        config_module.from_mapping(
            {"domains": {"a.example": {"verify": "callout", "verify_timeout": "0s"}}}, env={})
    [problem] = info.value.problems
    assert problem.startswith("<defaults>: domains.a.example.verify_timeout: ")


def test_without_callouts_a_callout_domain_decides_as_a_learned_one() -> None:
    known = _known(("bob@company.example", KnownState.INVALID, T0))
    counted = Counted()
    policy = _policy(known, counted, verify="callout")
    assert policy.verifies and policy.calls_out
    assert policy.check_recipient("bob@company.example") is not None
    assert policy.check_recipient("ann@company.example") is None
    assert counted == {"invalid": 1, "unknown": 1}


# -- the accept side's copy ------------------------------------------------------

def _row(address: str, state: KnownState, seen: datetime) -> KnownRecipient:
    return KnownRecipient(address, recipient_key(address), "company.example", state,
                          Source.DELIVERY, seen, seen)


async def test_the_copy_reads_changes_since_its_newest_row_and_reloads_when_rows_vanish() -> None:
    table = {"ann@company.example": _row("ann@company.example", KnownState.VALID, T0)}
    asked: list[datetime | None] = []

    async def read(since: datetime | None) -> tuple[list[KnownRecipient], int]:
        asked.append(since)
        rows = [r for r in table.values() if since is None or r.last_seen_at >= since]
        return rows, len(table)

    known = KnownRecipients()
    ttl = Ttl(DAY, DAY)
    await known.refresh(read)
    assert asked == [None] and known.state("ann@company.example", ttl, T0) is KnownState.VALID

    later = T0 + timedelta(hours=1)
    table["bob@company.example"] = _row("bob@company.example", KnownState.INVALID, later)
    await known.refresh(read)
    assert asked[1] == T0 - OVERLAP  # incremental, with overlap
    assert known.state("bob@company.example", ttl, later) is KnownState.INVALID

    del table["ann@company.example"]  # forgotten by `relay recipients forget`
    await known.refresh(read)
    assert asked[2:] == [later - OVERLAP, None]  # count differs: whole again
    assert known.state("ann@company.example", ttl, later) is None
    assert len(known) == 1

    await known.refresh(read, monotonic=FULL_INTERVAL - 1)
    await known.refresh(read, monotonic=FULL_INTERVAL)  # the last whole load is that old
    assert asked[4:] == [later - OVERLAP, None]


def test_what_this_node_taught_counts_at_once() -> None:
    known = KnownRecipients()
    known.taught([Learned("Cy@company.example", KnownState.INVALID)], T0)
    assert known.state("cy@company.example", Ttl(DAY, DAY), T0) is KnownState.INVALID


# -- the import file ---------------------------------------------------------------

def test_an_import_file_takes_addresses_and_local_parts_and_skips_comments() -> None:
    text = "# staff\nann\n\n  Bob@Company.Example  \ncy@xn--cmpany-cxa.example\n"
    with pytest.raises(ImportRefused, match=r"^f\.txt:5: 'cy@xn--cmpany-cxa\.example' is not "
                                            r"an address of company\.example$"):
        parse_import(text, "company.example", "f.txt")
    assert parse_import(text.replace("cy@xn--cmpany-cxa.example", "cy"), "company.example",
                        "f.txt") == ["ann@company.example", "Bob@Company.Example",
                                     "cy@company.example"]


@pytest.mark.parametrize(("line", "problem"), [
    ("ann smith", "one address a line"),
    ("a%b", "is not a valid local part"),
    ('"quoted"', "is not a valid local part"),
    ("ann@other.example", "is not an address of company.example"),
    ("@company.example", "is not an address of company.example"),
])
def test_an_import_line_that_is_no_address_of_the_domain_names_its_place(
        line: str, problem: str) -> None:
    with pytest.raises(ImportRefused) as info:
        parse_import(f"ok\n{line}\n", "company.example", "list.txt")
    assert str(info.value).startswith("list.txt:2: ") and problem in str(info.value)
