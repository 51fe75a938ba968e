"""The DATA deadline's arithmetic (Postfix's per-request deadline with a minimum data rate)."""

from __future__ import annotations

from relay.smtp.deadline import DataDeadline


def test_reads_earn_time_at_the_minimum_rate_up_to_the_timeout() -> None:
    deadline = DataDeadline.starting(now=100.0, timeout=10.0, min_rate=500)
    assert deadline.left(100.0) == 10.0
    deadline.fed(105.0, 1000)  # 2 s earned: 7 s left at 105
    assert deadline.left(105.0) == 7.0
    deadline.fed(106.0, 1_000_000)  # much earned, but never more than the timeout
    assert deadline.left(106.0) == 10.0


def test_a_byte_every_few_seconds_runs_out() -> None:
    deadline = DataDeadline.starting(now=0.0, timeout=10.0, min_rate=500)
    now = 0.0
    while deadline.left(now) > 0:
        now += 3.0
        deadline.fed(now, 1)
    assert now <= 12.0


def test_without_a_minimum_rate_it_is_an_idle_timeout() -> None:
    deadline = DataDeadline.starting(now=0.0, timeout=10.0, min_rate=0)
    for now in range(0, 100, 9):
        deadline.fed(float(now), 1)
        assert deadline.left(float(now)) == 10.0
