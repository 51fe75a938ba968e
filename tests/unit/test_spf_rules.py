"""SPF's pure parts: result names, the identity checked, the header, the config
rule, and `bounces.send_to = "spf-pass"` withholding DSNs in the one place they
are made (failure, delay warning, operator bounce)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from relay.core import config as configuration
from relay.delivery.outcomes import Rules, decide, delay_notice, rules_from_config, suppressed
from relay.smtp.spf import (
    RESULTS,
    SpfVerdict,
    authentication_results,
    identity,
    prepended,
    result_name,
)
from tests.unit.test_outcomes import BUSY, ORIGINAL, T0, UNKNOWN, claimed, report, rules


@pytest.mark.parametrize("name", RESULTS)
def test_the_seven_rfc_7208_results_are_kept(name: str) -> None:
    assert result_name(name) == name
    assert result_name(name.upper()) == name


@pytest.mark.parametrize(("raw", "name"), [
    ("error", "temperror"),  # pyspf's pre-RFC names
    ("unknown", "permerror"),
    ("ambiguous", "permerror"),
    ("something-new", "permerror"),
    ("", "permerror"),
])
def test_other_names_map_to_the_nearest_result(raw: str, name: str) -> None:
    assert result_name(raw) == name


@pytest.mark.parametrize(("sender", "helo", "expected"), [
    ("ann@Sender.Example", "x.example", ("ann@sender.example", "sender.example")),
    ("ann@sender.example.", "x.example", ("ann@sender.example", "sender.example")),
    ("", "Client.Example", ("postmaster@client.example", "client.example")),  # <>: HELO
    ("ann@bücher.example", "x", ("ann@xn--bcher-kva.example", "xn--bcher-kva.example")),
    ("jörg@bücher.example", "x", ("postmaster@xn--bcher-kva.example", "xn--bcher-kva.example")),
    ("ann@[192.0.2.1]", "x.example", None),  # an address literal: nothing to look up
    ("", "[192.0.2.1]", None),
    ("", "localhost", None),  # a dotless HELO name
    ("", "", None),
])
def test_the_identity_checked(sender: str, helo: str,
                              expected: tuple[str, str] | None) -> None:
    assert identity(sender, helo) == expected


def test_authentication_results_header() -> None:
    verdict = SpfVerdict("softfail", "sender.example")
    assert authentication_results("mail.verrotech.net", verdict) == (
        b"Authentication-Results: mail.verrotech.net; spf=softfail"
        b" smtp.mailfrom=sender.example\r\n")
    assert prepended("mail.verrotech.net", verdict) == authentication_results(
        "mail.verrotech.net", verdict)
    assert prepended("mail.verrotech.net", None) == b""  # SPF off


def test_spf_pass_bounces_need_spf_on() -> None:
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.from_mapping({"smtp": {"spf": False}, "bounces": {"send_to": "spf-pass"}})
    assert caught.value.problems == [
        '<defaults>: bounces.send_to: "spf-pass" needs smtp.spf = true']
    config = configuration.from_mapping({"bounces": {"send_to": "spf-pass"}})
    assert config.smtp.spf is True
    assert rules_from_config(config).send_to == "spf-pass"
    assert rules_from_config(configuration.from_mapping({})).send_to == "all"


def spf_rules(send_to: str = "spf-pass") -> Rules:
    return dataclasses.replace(rules(delay_warning=3600), send_to=send_to)


@pytest.mark.parametrize(("send_to", "spf", "held"), [
    ("all", "fail", None),
    ("all", None, None),
    ("spf-pass", "pass", None),
    ("spf-pass", "fail", "fail"),
    ("spf-pass", "softfail", "softfail"),
    ("spf-pass", "temperror", "temperror"),
    ("spf-pass", None, "none"),  # stored without a result: SPF off, or an older row
])
def test_which_senders_get_dsns(send_to: str, spf: str | None, held: str | None) -> None:
    message = dataclasses.replace(claimed("a@verrotech.com"), spf=spf)
    assert suppressed(spf_rules(send_to), message) == held


@pytest.mark.parametrize(("spf", "dsns", "held"), [
    ("pass", 1, ()),
    ("fail", 0, ("fail",)),
    ("neutral", 0, ("neutral",)),
])
def test_a_failure_dsn_is_withheld_unless_spf_passed(
    spf: str, dsns: int, held: tuple[str, ...],
) -> None:
    message = dataclasses.replace(claimed("a@verrotech.com"), spf=spf)
    d = decide(spf_rules(), message, "n", T0,
               report=report(a=UNKNOWN), original=ORIGINAL)
    assert len(d.attempt.dsns) == dsns
    assert d.attempt.suppressed == held
    assert [o.value for _, o, _ in d.results] == ["bounced"]  # the bounce itself stands


def test_a_delay_warning_is_withheld_and_not_tried_again() -> None:
    message = dataclasses.replace(claimed("a@verrotech.com"), spf="fail")
    later = T0 + timedelta(hours=2)
    d = decide(spf_rules(), message, "n", later,
               report=report(a=BUSY), original=ORIGINAL)
    assert d.attempt.dsns == ()
    assert d.attempt.suppressed == ("fail",)
    assert d.attempt.delay_warned is True  # the sweep does not come back for it
    notice = delay_notice(spf_rules(), message, "n", later, ORIGINAL)
    assert notice.dsns == ()
    assert notice.suppressed == ("fail",)
    assert notice.delay_warned is True
    passed = dataclasses.replace(message, spf="pass")
    assert len(delay_notice(spf_rules(), passed, "n", later,
                            ORIGINAL).dsns) == 1


def test_an_operator_bounce_is_withheld_too() -> None:
    message = dataclasses.replace(claimed("a@verrotech.com"), spf="permerror")
    d = decide(spf_rules(), message, "n", T0, report=None,
               original=ORIGINAL, operator_bounce=True)
    assert d.attempt.dsns == ()
    assert d.attempt.suppressed == ("permerror",)
