"""Backoff is a pure function: a table of attempts against delays."""

import random
from datetime import UTC, datetime, timedelta

import pytest

from relay.delivery.backoff import JITTER, BackoffPolicy

POLICY = BackoffPolicy(min_backoff=300, max_backoff=3600, max_lifetime=5 * 86400)


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [(1, 300), (2, 600), (3, 1200), (4, 2400), (5, 3600), (6, 3600), (50, 3600), (500, 3600)],
)
def test_delay_table(attempts: int, delay: float) -> None:
    assert POLICY.delay(attempts) == delay


def test_jitter_stays_within_bounds_and_varies() -> None:
    rng = random.Random(7)
    delays = [POLICY.delay(1, rng) for _ in range(200)]
    assert all(300 * (1 - JITTER) <= d <= 300 * (1 + JITTER) for d in delays)
    assert len(set(delays)) > 100


def test_jitter_is_deterministic_per_seed() -> None:
    assert POLICY.delay(3, random.Random(1)) == POLICY.delay(3, random.Random(1))


def test_expiry_boundary() -> None:
    received = datetime(2026, 1, 1, tzinfo=UTC)
    assert not POLICY.expired(received, received + timedelta(days=5) - timedelta(seconds=1))
    assert POLICY.expired(received, received + timedelta(days=5))
