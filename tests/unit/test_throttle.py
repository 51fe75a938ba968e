"""Slow start per destination: a table of events against window sizes."""

import pytest

from relay.core.model import DeliveryReport, Reply
from relay.delivery.throttle import INITIAL_WINDOW, Window, pushed_back


def test_window_starts_small_and_grows_to_the_limit() -> None:
    window = Window(limit=20)
    assert window.sessions == INITIAL_WINDOW
    for _ in range(100):
        window.success()
    assert window.sessions == 20


def test_window_never_starts_above_the_limit() -> None:
    assert Window(limit=2).sessions == 2


@pytest.mark.parametrize(("pushes", "sessions"), [(1, 10), (2, 5), (3, 2), (10, 1)])
def test_push_back_halves_down_to_one(pushes: int, sessions: int) -> None:
    window = Window(limit=20, size=20)
    for _ in range(pushes):
        window.push_back()
    assert window.sessions == sessions


@pytest.mark.parametrize(
    ("durations", "slow_at"),
    [
        ([0.1] * 10 + [0.3], []),  # fast and a little slower: below the floor
        ([1.0] * 10 + [5.0], [10]),  # five times the average, over the floor
        ([1.0] * 10 + [3.0], []),  # three times: not yet
        ([5.0] * 10 + [6.0], []),  # slow all along: nothing changed
        ([0.5] * 5 + [9.0, 9.0, 9.0], [5, 6]),  # twice; then the average has caught up
    ],
)
def test_slow_down_detection(durations: list[float], slow_at: list[int]) -> None:
    window = Window(limit=20, size=20)
    seen = [n for n, seconds in enumerate(durations) if window.timed(seconds)]
    assert seen == slow_at
    assert window.sessions == 20 // 2 ** len(slow_at)


def report(*codes_texts: tuple[int, str]) -> DeliveryReport:
    return DeliveryReport(replies={f"r{n}@x.example": Reply(c, t)
                                   for n, (c, t) in enumerate(codes_texts)})


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        ([(421, "4.7.0 too many connections")], True),
        ([(450, "4.7.1 try again later, too busy"), (421, "4.3.2 shutting down")], True),
        ([(450, "4.2.1 mailbox busy")], False),  # a recipient problem, not throttling
        ([(421, "4.7.0 busy"), (250, "2.0.0 ok")], False),
        ([], False),
    ],
)
def test_push_back_recognised(replies: list[tuple[int, str]], expected: bool) -> None:
    assert pushed_back(report(*replies)) is expected
