"""DATA taken apart in bulk gives what reading it a line at a time gives."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.smtp.data import LINE_TOO_LONG, MAX_LINE, TOO_BIG, DataReceiver

Outcome = tuple[bytes, str | None, int] | None


def line_at_a_time(stream: bytes, max_size: int) -> Outcome:
    """The rules, read the obvious way: (kept data, problem, offset past the
    final dot), or None when the stream holds no end of data."""
    kept: list[bytes] = []
    size, problem, pos = 0, None, 0
    while True:
        eol = stream.find(b"\r\n", pos)
        if eol < 0:
            return None
        line, pos = stream[pos:eol + 2], eol + 2
        if line == b".\r\n":
            return b"".join(kept), problem, pos
        line = line[1:] if line.startswith(b".") else line
        size += len(line)
        if problem is not None:
            continue
        if len(line) > MAX_LINE:
            problem, kept = LINE_TOO_LONG, []
        elif size > max_size:
            problem, kept = TOO_BIG, []
        else:
            kept.append(line)


def in_pieces(stream: bytes, cuts: list[int], max_size: int) -> Outcome:
    """Feed `stream` cut at `cuts`; the same shape of answer as `line_at_a_time`."""
    receiver = DataReceiver(max_size)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, stop in itertools.pairwise(bounds):
        end = receiver.feed(stream[start:stop])
        if end >= 0:
            assert 0 < end <= stop - start
            assert receiver.blocks[:1] == [b""] or receiver.problem is not None
            return b"".join(receiver.blocks), receiver.problem, start + end
    return None


TOKENS = [b"a", b"\r", b"\n", b".", b"\r\n", b".\r\n", b"\r\n.\r\n", b"\r\n..\r\n",
          b"\n.\r\n", b"\r.\r\n", b"\x00", b"y" * 300, b"z" * 997]


@settings(max_examples=600, deadline=None)
@given(
    stream=st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=50_000), max_size=12),
    max_size=st.sampled_from([0, 3, 50, 1000, 2500, 10**6]),
)
@example(stream=b"x" * 998 + b"\r\n.\r\n", cuts=[500, 999], max_size=10**6)
@example(stream=b"." + b"x" * 998 + b"\r\n.\r\n", cuts=[999, 1000], max_size=10**6)
@example(stream=b"x" * 2000 + b".\r\n.\r\n", cuts=[1500, 2000], max_size=10**6)
@example(stream=b"a\r\n" + b"x" * 999 + b"\r\n.\r\n", cuts=[], max_size=10**6)
@example(stream=b"x" * 2000 + b"\r\n.\r\n", cuts=[1500, 2001], max_size=10**6)
@example(stream=b"x" * 1500 + b"\r\n.\r\n", cuts=[1501], max_size=10**6)
def test_any_cutting_gives_the_line_at_a_time_answer(stream: bytes, cuts: list[int],
                                                     max_size: int) -> None:
    assert in_pieces(stream, cuts, max_size) == line_at_a_time(stream, max_size)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000, 10**6])
def test_byte_by_byte_and_in_one_piece_agree(step: int) -> None:
    stream = (b"Subject: x\r\n\r\n..stuffed\r\nbare\nLF\r\n" + b"w" * 998 + b"\r\n"
              + b"\r\n..\r\n.\r\nQUIT\r\n")
    cuts = list(range(step, len(stream), step))
    expected = (b"Subject: x\r\n\r\n.stuffed\r\nbare\nLF\r\n" + b"w" * 998 + b"\r\n\r\n.\r\n",
                None, len(stream) - len(b"QUIT\r\n"))
    assert in_pieces(stream, cuts, 10**6) == line_at_a_time(stream, 10**6) == expected


def test_the_size_limit_counts_unstuffed_lines_and_is_inclusive() -> None:
    body = b"..x\r\n" * 10  # 40 octets once unstuffed
    assert in_pieces(body + b".\r\n", [], 40) == (b".x\r\n" * 10, None, 53)
    assert in_pieces(body + b".\r\n", [], 39) == (b"", TOO_BIG, 53)


def test_the_first_problem_in_line_order_is_kept() -> None:
    long_line = b"x" * 999 + b"\r\n"
    assert in_pieces(long_line + b"y" * 50 + b"\r\n.\r\n", [], 1010)[1] == LINE_TOO_LONG
    assert in_pieces(b"y" * 50 + b"\r\n" + long_line + b".\r\n", [], 20)[1] == TOO_BIG


def test_an_unfinished_overlong_line_is_not_buffered() -> None:
    receiver = DataReceiver(10**9)
    for _ in range(1000):
        assert receiver.feed(b"q" * 4096) == -1
    assert receiver.problem == LINE_TOO_LONG
    assert len(receiver._partial) <= 1  # only a CR that may start the CRLF
    assert receiver.feed(b"\r\n.\r\nNOOP\r\n") == len(b"\r\n.\r\n")
