"""relay.core.dsnparams: RFC 3461 parameters and xtext, valid, invalid and repeated."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.dsnparams import (
    MailParams,
    ParamError,
    RcptParams,
    orcpt_address,
    take_mail_params,
    take_rcpt_params,
    wants,
    xtext_decode,
    xtext_encode,
)


@given(st.text())
def test_xtext_round_trips_any_text(text: str) -> None:
    encoded = xtext_encode(text)
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126)))
def test_xtext_encoding_of_decoded_xtext_is_canonical(text: str) -> None:
    decoded = xtext_decode(text)
    if isinstance(decoded, str):  # valid xtext: decoding then encoding gives it back,
        # but for "+XX" spelling a character that needs no escape
        assert xtext_decode(xtext_encode(decoded)) == decoded


@pytest.mark.parametrize(("xtext", "text"), [
    ("abc", "abc"),
    ("a+2Bb", "a+b"),
    ("a+3Db", "a=b"),
    ("a+20b", "a b"),
    ("+C3+A9", "é"),
])
def test_xtext_decode(xtext: str, text: str) -> None:
    assert xtext_decode(xtext) == text


@pytest.mark.parametrize("bad", ["a+2", "a+zz", "a+2b", "a=b", "a b", "é", "+FF"])
def test_xtext_decode_refuses(bad: str) -> None:
    assert isinstance(xtext_decode(bad), ParamError)


def test_mail_params_are_taken_out_and_kept_as_sent() -> None:
    taken = take_mail_params(["SIZE=10", "ret=hdrs", "ENVID=Q+2B1.x", "BODY=8BITMIME"])
    assert taken == (MailParams("HDRS", "Q+2B1.x"), ["SIZE=10", "BODY=8BITMIME"])
    assert MailParams("HDRS", "Q+2B1.x").options() == ["RET=HDRS", "ENVID=Q+2B1.x"]
    assert take_mail_params([]) == (MailParams(), [])


@pytest.mark.parametrize(("params", "reply"), [
    (["RET=ALL"], "501 5.5.4 Bad RET parameter: FULL or HDRS expected"),
    (["RET="], "501 5.5.4 Bad RET parameter: a value is required"),
    (["RET"], "501 5.5.4 Bad RET parameter: a value is required"),
    (["RET=FULL", "ret=HDRS"], "501 5.5.4 Repeated RET parameter"),
    (["ENVID=a", "ENVID=a"], "501 5.5.4 Repeated ENVID parameter"),
    (["ENVID=" + "x" * 101], "501 5.5.4 Bad ENVID parameter: longer than 100 characters"),
    (["ENVID=a+0Db"], "501 5.5.4 Bad ENVID parameter: not printable US-ASCII"),
    (["ENVID=a+4"], "501 5.5.4 Bad ENVID parameter: Bad xtext: '+' must be followed by two"
                    " upper-case hex digits"),
])
def test_bad_mail_params(params: list[str], reply: str) -> None:
    error = take_mail_params(params)
    assert isinstance(error, ParamError)
    assert error.reply == reply


@pytest.mark.parametrize(("params", "expected"), [
    (["NOTIFY=NEVER"], RcptParams(("NEVER",))),
    (["notify=success,Delay"], RcptParams(("SUCCESS", "DELAY"))),
    (["NOTIFY=FAILURE", "ORCPT=rfc822;bob+2Bx@example.com"],
     RcptParams(("FAILURE",), "rfc822;bob+2Bx@example.com")),
    (["ORCPT=UTF-8;j\\x{F6}rg@example.com"], RcptParams(None, "UTF-8;j\\x{F6}rg@example.com")),
])
def test_rcpt_params(params: list[str], expected: RcptParams) -> None:
    assert take_rcpt_params(params) == (expected, [])


@pytest.mark.parametrize(("params", "reply"), [
    (["NOTIFY=NEVER,SUCCESS"], "501 5.5.4 Bad NOTIFY parameter: NEVER, or SUCCESS, FAILURE, DELAY"),
    (["NOTIFY=SOMETIMES"], "501 5.5.4 Bad NOTIFY parameter: NEVER, or SUCCESS, FAILURE, DELAY"),
    (["NOTIFY=SUCCESS,SUCCESS"], "501 5.5.4 Bad NOTIFY parameter: a word is repeated"),
    (["NOTIFY=SUCCESS,"], "501 5.5.4 Bad NOTIFY parameter: NEVER, or SUCCESS, FAILURE, DELAY"),
    (["NOTIFY=NEVER", "NOTIFY=NEVER"], "501 5.5.4 Repeated NOTIFY parameter"),
    (["ORCPT=rfc822;a@b", "orcpt=rfc822;a@b"], "501 5.5.4 Repeated ORCPT parameter"),
    (["ORCPT=bob@example.com"], "501 5.5.4 Bad ORCPT parameter: addr-type;address expected"),
    (["ORCPT=x400;bob"], "501 5.5.4 Bad ORCPT parameter: unknown address type x400"),
    (["ORCPT=rfc822;"], "501 5.5.4 Bad ORCPT parameter: addr-type;address expected"),
    (["ORCPT=rfc822;a+zz"], "501 5.5.4 Bad xtext: '+' must be followed by two upper-case hex"
                            " digits"),
    (["ORCPT=utf-8;jörg@example.com"], "501 5.5.4 Bad ORCPT parameter: UTF-8 without SMTPUTF8"),
    (["ORCPT=utf-8;a\\b@example.com"], "501 5.5.4 Bad ORCPT address: '\\' outside \\x{HEX}"),
    (["ORCPT=rfc822;" + "a" * 500], "501 5.5.4 Bad ORCPT parameter: longer than 500 characters"),
])
def test_bad_rcpt_params(params: list[str], reply: str) -> None:
    error = take_rcpt_params(params)
    assert isinstance(error, ParamError)
    assert error.reply == reply


def test_utf8_orcpt_in_every_rfc6533_form() -> None:
    assert orcpt_address("utf-8;j\\x{F6}rg@example.com") == ("utf-8", "jörg@example.com")
    assert orcpt_address("utf-8;jörg@example.com") == ("utf-8", "jörg@example.com")
    assert orcpt_address("utf-8;j+C3+B6rg@example.com") == ("utf-8", "jörg@example.com")
    assert orcpt_address("RFC822;b+2Bx@example.com") == ("rfc822", "b+x@example.com")
    assert take_rcpt_params(["ORCPT=utf-8;jörg@example.com"], smtputf8=True) == (
        RcptParams(None, "utf-8;jörg@example.com"), [])


def test_utf8_orcpt_goes_7bit_to_a_hop_without_smtputf8() -> None:
    params = RcptParams(("SUCCESS",), "utf-8;jörg\\x{2B}x@example.com")
    assert params.options() == ["NOTIFY=SUCCESS", "ORCPT=utf-8;jörg\\x{2B}x@example.com"]
    assert params.options(smtputf8=False) == [
        "NOTIFY=SUCCESS", "ORCPT=utf-8;j\\x{F6}rg\\x{2B}x@example.com"]


@pytest.mark.parametrize(("notify", "event", "wanted"), [
    (None, "FAILURE", True), (None, "DELAY", True), (None, "SUCCESS", False),
    (("NEVER",), "FAILURE", False), (("NEVER",), "DELAY", False),
    (("SUCCESS",), "SUCCESS", True), (("SUCCESS",), "FAILURE", False),
    (("FAILURE", "DELAY"), "DELAY", True),
])
def test_wants(notify: tuple[str, ...] | None, event: str, wanted: bool) -> None:
    assert wants(notify, event) is wanted


def test_only_orcpt_may_carry_raw_utf8_on_the_command_line() -> None:
    from relay.smtp.policy import PathSyntaxError, split_path

    assert split_path("<a@b.example> ORCPT=utf-8;jörg@b.example NOTIFY=NEVER") == (
        "a@b.example", ["ORCPT=utf-8;jörg@b.example", "NOTIFY=NEVER"])
    with pytest.raises(PathSyntaxError):
        split_path("<a@b.example> ENVID=jörg")
