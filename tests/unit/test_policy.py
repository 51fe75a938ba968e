"""Recipient policy: hosted domains, recipient lists and files, relay tricks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import config as config_module
from relay.core.address import host_key
from relay.smtp.policy import (
    PathSyntaxError,
    Policy,
    RecipientFile,
    RecipientsUnavailable,
    sender_address,
    split_path,
)

HOSTED = ("verrotech.com", "verrotech.org", "xn--bcher-kva.example")


class Ticker:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_policy(tmp_path: Path, file_lines: str | None = "bob\n", **kwargs: object) -> Policy:
    domains: dict[str, dict[str, object]] = {
        "verrotech.com": {"recipients": ["Bob", "carol@verrotech.com"]},
        "verrotech.org": {},
        "xn--bcher-kva.example": {},
    }
    if file_lines is not None:
        path = tmp_path / "recipients.txt"
        path.write_text(file_lines)
        domains["files.example"] = {"recipients_file": str(path)}
    cfg = config_module.from_mapping({"domains": domains}, env={}, base=tmp_path)
    return Policy(cfg, **kwargs)  # type: ignore[arg-type]


# -- split_path / sender_address ------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "path", "params"),
    [
        ("<bob@verrotech.com>", "bob@verrotech.com", []),
        ("  <bob@verrotech.com>  SIZE=10 BODY=8BITMIME", "bob@verrotech.com",
         ["SIZE=10", "BODY=8BITMIME"]),
        ("bob@verrotech.com SIZE=10", "bob@verrotech.com", ["SIZE=10"]),
        ("<>", "", []),
        ('<"a>b"@verrotech.com>', '"a>b"@verrotech.com', []),
        ("<@relay.example,@b.example:bob@verrotech.com>",
         "@relay.example,@b.example:bob@verrotech.com", []),
    ],
)
def test_split_path(argument: str, path: str, params: list[str]) -> None:
    assert split_path(argument) == (path, params)


@pytest.mark.parametrize(
    "argument",
    ["<bob@verrotech.com", "<bob@verrotech.com>junk", "<a@b> =x", "<a@b> SIZE=", "a<b@c",
     "<a\x00b@c>", "<a\tb@c>", "", "<" + "a" * 300 + "@b.example>"],
)
def test_split_path_rejects(argument: str) -> None:
    with pytest.raises(PathSyntaxError):
        split_path(argument)


@pytest.mark.parametrize(
    ("path", "sender"),
    [("", ""), ("a@b.example", "a@b.example"), ("@relay.example:a@b.example", "a@b.example"),
     ('"john doe"@b.example', '"john doe"@b.example'), ("a@[192.0.2.1]", "a@[192.0.2.1]")],
)
def test_sender_address(path: str, sender: str) -> None:
    assert sender_address(path) == sender


@pytest.mark.parametrize("path", ["bob", "@b.example", "a@", "a b@c.example", "a@b..c", "@x"])
def test_sender_address_rejects(path: str) -> None:
    with pytest.raises(PathSyntaxError):
        sender_address(path)


@pytest.mark.parametrize(
    ("domain", "key"),
    [("VerroTech.COM", "verrotech.com"), ("verrotech.com.", "verrotech.com"),
     ("bücher.example", "xn--bcher-kva.example"), ("verrotech.com..", None), ("a..b", None),
     ("[127.0.0.1]", None), ("-a.example", None), ("", None)],
)
def test_host_key(domain: str, key: str | None) -> None:
    assert host_key(domain) == key


# -- check_recipient ------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "bob@other.example",
        "bob%other.example@verrotech.org",
        "other.example!bob@verrotech.org",
        "bob@other.example@verrotech.org",
        '"bob@other.example"@verrotech.org',
        '"bob"@verrotech.org',
        "@verrotech.org:bob@other.example",
        "@other.example:bob@verrotech.org",
        "bob@verrotech.org.other.example",
        "bob@sub.verrotech.org",
        "bob@[127.0.0.1]",
        "postmaster",
        "bob@verrotech.org..",
        "@verrotech.org",
    ],
)
def test_relay_attempts_get_554(tmp_path: Path, path: str) -> None:
    reply = make_policy(tmp_path).check_recipient(path)
    assert reply is not None
    assert str(reply) == f"554 5.7.1 <{path}>: Relay access denied"


@pytest.mark.parametrize(
    "path",
    ["bob@verrotech.com", "BOB@VerroTech.Com", "carol@verrotech.com", "Carol@verrotech.com.",
     "anyone@verrotech.org", "x.y+tag@verrotech.org", "jöran@verrotech.org",
     "someone@bücher.example", "bob@files.example"],
)
def test_accepted(tmp_path: Path, path: str) -> None:
    assert make_policy(tmp_path).check_recipient(path) is None


@pytest.mark.parametrize("path", ["dave@verrotech.com", "carol.x@verrotech.com",
                                  "dave@files.example"])
def test_unknown_users_get_550(tmp_path: Path, path: str) -> None:
    reply = make_policy(tmp_path).check_recipient(path)
    assert str(reply) == f"550 5.1.1 <{path}>: Recipient address rejected: User unknown"


@pytest.mark.parametrize("path", ["a b@verrotech.org", "a\\b@verrotech.org", "a(b)@verrotech.org",
                                  "@", "a;b@verrotech.org"])
def test_bad_local_part_syntax(tmp_path: Path, path: str) -> None:
    reply = make_policy(tmp_path).check_recipient(path)
    assert reply is not None and reply.code in (501, 554)


def test_hosted(tmp_path: Path) -> None:
    policy = make_policy(tmp_path)
    assert policy.hosted("VERROTECH.com.") == "verrotech.com"
    assert policy.hosted("other.example") is None


# -- recipients_file ------------------------------------------------------------


def test_recipient_file_format(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("# comment\n\nBob@Files.Example OK\n  carol  \n#dave\n@catchall.example\n")
    assert RecipientFile(str(path)).entries() == {"bob@files.example", "carol",
                                                  "@catchall.example"}


def test_recipient_file_reloads_when_changed_but_stats_at_most_once_per_interval(
    tmp_path: Path,
) -> None:
    ticker = Ticker()
    policy = make_policy(tmp_path, "bob\n", recheck_interval=1.0, monotonic=ticker)
    path = tmp_path / "recipients.txt"
    assert policy.check_recipient("dave@files.example") is not None
    path.write_text("bob\ndave\n")
    ticker.now = 0.5  # within the interval: the old list still answers
    assert policy.check_recipient("dave@files.example") is not None
    ticker.now = 1.0
    assert policy.check_recipient("dave@files.example") is None
    # Same size, new content: the mtime (or inode) tells.
    path.write_text("bob\nerin\n")
    os.utime(path, ns=(1, 1))
    ticker.now = 2.0
    assert policy.check_recipient("erin@files.example") is None
    assert policy.check_recipient("dave@files.example") is not None


def test_atomic_replace_is_noticed(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "bob\n", recheck_interval=0)
    new = tmp_path / "new.txt"
    new.write_text("zoe\n")
    os.replace(new, tmp_path / "recipients.txt")
    assert policy.check_recipient("zoe@files.example") is None
    assert policy.check_recipient("bob@files.example") is not None


def test_unreadable_file_answers_451_never_opens_the_domain(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "bob\n", recheck_interval=0)
    path = tmp_path / "recipients.txt"
    path.unlink()
    for address in ("bob@files.example", "anyone@files.example"):
        reply = policy.check_recipient(address)
        assert str(reply) == f"451 4.3.0 <{address}>: Temporary lookup failure"
    path.write_bytes(b"\xff\xfe not utf-8\n")
    assert policy.check_recipient("bob@files.example").code == 451  # type: ignore[union-attr]
    path.write_text("bob\n")
    assert policy.check_recipient("bob@files.example") is None


def test_unreadable_file_raises(tmp_path: Path) -> None:
    with pytest.raises(RecipientsUnavailable):
        RecipientFile(str(tmp_path / "missing")).entries()


def test_empty_file_accepts_nobody(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "# nobody yet\n")
    assert policy.check_recipient("bob@files.example").code == 550  # type: ignore[union-attr]


def test_list_and_file_are_a_union(tmp_path: Path) -> None:
    path = tmp_path / "more.txt"
    path.write_text("erin\n")
    cfg = config_module.from_mapping(
        {"domains": {"verrotech.com": {"recipients": ["bob"], "recipients_file": str(path)}}},
        env={},
    )
    policy = Policy(cfg)
    assert policy.check_recipient("bob@verrotech.com") is None
    assert policy.check_recipient("erin@verrotech.com") is None
    assert policy.check_recipient("zoe@verrotech.com").code == 550  # type: ignore[union-attr]


# -- fuzzing: nothing but a plain local part at a hosted domain is ever accepted --

_SAFE_LOCAL = re.compile(r"[A-Za-z0-9#$&'*+/=?^_`{|}~.\x80-\U0010ffff-]+")
_PIECES = st.sampled_from(
    ["bob", "x", "@", "%", "!", '"', ":", ",", ".", "<", ">", "\\", " ", "[", "]", "ö",
     "verrotech.org", "verrotech.com", "other.example", "VERROTECH.ORG", "@verrotech.org",
     "@other.example", "127.0.0.1", "-", "+", "xn--bcher-kva.example", "bücher.example"]
)
_PATHS = st.one_of(
    st.lists(_PIECES, max_size=8).map("".join),
    st.text(max_size=40),
    st.tuples(st.lists(_PIECES, min_size=1, max_size=4).map("".join),
              st.sampled_from(["@verrotech.org", "@bücher.example", "@VERROTECH.ORG."]))
    .map("".join),
)


def _acceptable(path: str) -> bool:
    local, at, domain = path.rpartition("@")
    return bool(at and _SAFE_LOCAL.fullmatch(local)) and host_key(domain) in HOSTED


@settings(max_examples=500, deadline=None)
@given(path=_PATHS)
def test_fuzz_never_accepts_a_relay(path: str) -> None:
    policy = _FUZZ_POLICY
    if policy.check_recipient(path) is None:
        assert _acceptable(path), path
        assert not path.startswith("@") and '"' not in path


_FUZZ_POLICY = Policy(config_module.from_mapping(
    {"domains": {"verrotech.org": {}, "xn--bcher-kva.example": {}}}, env={}))


def test_recipient_lists_match_either_spelling_of_an_idn_domain(tmp_path: Path) -> None:
    listed = tmp_path / "listed.txt"
    listed.write_text("Eve@XN--BCHER-KVA.test\n")
    cfg = config_module.from_mapping({"domains": {
        "bücher.test": {"recipients": ["uni@bücher.test"],
                        "recipients_file": str(listed)},
    }}, env={}, base=tmp_path)
    policy = Policy(cfg)
    assert policy.hosted("BÜCHER.test.") == policy.hosted("xn--bcher-kva.test") \
        == "xn--bcher-kva.test"
    for path in ("uni@bücher.test", "UNI@xn--bcher-kva.test", "eve@Bücher.Test",
                 "eve@xn--bcher-kva.test"):
        assert policy.check_recipient(path) is None, path
    assert policy.check_recipient("zoe@bücher.test").code == 550  # type: ignore[union-attr]
