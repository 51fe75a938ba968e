"""relay.core.address: one parse for domains and addresses, A-label keys, clear errors."""

from __future__ import annotations

import idna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.address import (
    NULL_SENDER,
    Address,
    AddressError,
    Domain,
    destination_key,
    host_key,
    parse_address,
    parse_domain,
)


@pytest.mark.parametrize(
    ("text", "key", "display"),
    [
        ("verrotech.com", "verrotech.com", "verrotech.com"),
        ("VerroTech.COM.", "verrotech.com", "verrotech.com"),
        ("  verrotech.com  ", "verrotech.com", "verrotech.com"),
        ("bücher.test", "xn--bcher-kva.test", "bücher.test"),
        ("BÜCHER.Test", "xn--bcher-kva.test", "bücher.test"),
        ("xn--bcher-kva.test", "xn--bcher-kva.test", "bücher.test"),
        ("XN--BCHER-KVA.TEST.", "xn--bcher-kva.test", "bücher.test"),
        ("faß.de", "xn--fa-hia.de", "faß.de"),  # IDNA 2008, not 2003's "fass.de"
        ("bücher\u3002test", "xn--bcher-kva.test", "bücher.test"),  # UTS #46 dot mapping
        ("localhost", "localhost", "localhost"),
        ("r3--sn-abc.example", "r3--sn-abc.example", "r3--sn-abc.example"),
        ("[192.0.2.1]", "[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8::1]", "[IPv6:2001:DB8::1]", "[IPv6:2001:DB8::1]"),
    ],
)
def test_parse_domain(text: str, key: str, display: str) -> None:
    domain = parse_domain(text)
    assert (domain.key, domain.display) == (key, display)
    assert str(domain) == key
    assert domain.is_literal == key.startswith("[")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty domain"),
        (".", "empty"),
        ("a..b", "empty label"),
        ("verrotech.com..", "empty label"),
        ("-a.example", "starts or ends with '-'"),
        ("a-.example", "starts or ends with '-'"),
        ("a b.example", "characters other than"),
        ("a_b.example", "characters other than"),
        ("@verrotech.com", "characters other than"),
        ("x" * 64 + ".example", "longer than 63"),
        (".".join(["abcdefghi"] * 26), "longer than 253"),
        ("xn--abc.example", "bad A-label"),
        ("bü_cher.example", "not allowed"),
        ("bücher..example", "empty label"),
        ("äb--cd.example", "hyphens in 3rd and 4th position"),
        ("[192.0.2.1", "missing ']'"),
        ("[]", "missing ']'"),
        ("[300.0.0.1]", "not an address literal"),
        ("[IPv6:zz::1]", "not an address literal"),
        ("[a b]", "not an address literal"),
        ("\udcff.example", "is not a domain name"),  # undecodable bytes from a client
    ],
)
def test_parse_domain_rejects_with_the_problem(text: str, problem: str) -> None:
    with pytest.raises(AddressError, match=problem.replace("(", r"\(")) as caught:
        parse_domain(text)
    assert "Traceback" not in str(caught.value)


def test_parse_address() -> None:
    address = parse_address("Uni@Bücher.Test")
    assert address == Address("Uni", Domain("xn--bcher-kva.test", "bücher.test"))
    assert address.key == str(address) == "Uni@xn--bcher-kva.test"  # local part as given
    assert address.display == "Uni@bücher.test"
    assert not address.is_null
    assert parse_address("a@b@verrotech.com").local == "a@b"  # the last @ splits
    assert parse_address("") is NULL_SENDER
    assert NULL_SENDER.is_null and NULL_SENDER.key == NULL_SENDER.display == ""
    assert parse_address("bob@[192.0.2.1]").domain == Domain("[192.0.2.1]", "[192.0.2.1]")


@pytest.mark.parametrize(
    ("text", "problem"),
    [("bob", "no '@domain'"), ("@verrotech.com", "empty local part"), ("bob@", "empty domain"),
     ("bob@a..b", "empty label")],
)
def test_parse_address_rejects(text: str, problem: str) -> None:
    with pytest.raises(AddressError, match=problem):
        parse_address(text)


def test_host_key_and_destination_key() -> None:
    assert host_key("Bücher.test.") == "xn--bcher-kva.test"
    assert host_key("[192.0.2.1]") is None  # a literal is never a hosted domain
    assert host_key("a..b") is None
    assert destination_key("BÜCHER.test") == "xn--bcher-kva.test"
    assert destination_key("[IPv6:2001:DB8::1]") == "[IPv6:2001:DB8::1]"
    assert destination_key("Not A Domain.") == "not a domain"  # never raises


# -- properties -------------------------------------------------------------------

_LDH = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
_UNICODE_LABEL = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzäöüßéçøåñ0123456789ÄÖÜ"),
    min_size=1, max_size=12)
_NAMES = st.lists(st.one_of(_LDH, _UNICODE_LABEL), min_size=1, max_size=4).map(".".join)


@settings(max_examples=300, deadline=None)
@given(name=_NAMES, final_dot=st.booleans())
def test_round_trip_through_either_spelling(name: str, final_dot: bool) -> None:
    try:
        domain = parse_domain(name + ("." if final_dot else ""))
    except AddressError:
        return  # e.g. "ab--cd" as a U-label: the rejects property covers errors
    assert domain.key.isascii() and domain.key == domain.key.lower()
    assert not domain.key.endswith(".")
    assert parse_domain(domain.key) == domain  # A-label spelling
    assert parse_domain(domain.display) == domain  # U-label spelling
    assert parse_domain(domain.key.upper()) == domain  # any case
    for a_label, shown in zip(domain.key.split("."), domain.display.split("."), strict=True):
        # idna's U-label for each A-label; an LDH label such as "ab--cd" stays as it is
        assert shown == (idna.decode(a_label) if a_label.startswith("xn--") else a_label)


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=80))
def test_anything_parses_or_raises_address_error(text: str) -> None:
    try:
        domain = parse_domain(text)
    except AddressError as exc:
        assert str(exc)
        return
    if not domain.is_literal:
        assert domain.key.isascii() and len(domain.key) <= 253
        assert all(0 < len(label) <= 63 for label in domain.key.split("."))
        assert parse_domain(domain.display) == domain


@settings(max_examples=300, deadline=None)
@given(local=st.text(min_size=1, max_size=20), name=_NAMES)
def test_address_keeps_the_local_part(local: str, name: str) -> None:
    try:
        address = parse_address(f"{local}@{name}")
    except AddressError:
        return
    assert address.local == local
    assert address.domain == parse_domain(name)


def test_a_name_and_its_a_label_spelling_are_judged_alike() -> None:
    """An LDH label with hyphens in 3rd and 4th position next to a U-label:
    accepted in either spelling, or neither (idna refuses it inside a
    Unicode name; DNS has such names)."""
    assert parse_domain("ab--cd.ä") == parse_domain("ab--cd.xn--4ca")
    assert parse_domain("ab--cd.xn--4ca").display == "ab--cd.ä"
