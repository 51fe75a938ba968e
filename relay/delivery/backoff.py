"""Retry timing: pure functions of attempts, time in queue and a random source.

Owns the backoff formula of SPEC "Delivery" and the expiry rule. Refuses to
read a clock or touch the queue: callers pass "now" and apply the decision.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

JITTER = 0.1  # +-10 %: a restart must not retry everything in the same second


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    min_backoff: float  # seconds before the first retry
    max_backoff: float  # the clamp
    max_lifetime: float  # time in queue after which a message bounces

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds until the next try after `attempts` failed attempts (>= 1).

        `min(max_backoff, min_backoff * 2**(attempts-1))`, then jittered by
        up to JITTER either way (never above max_backoff * (1 + JITTER)).
        """
        exponent = max(0, attempts - 1)
        base = self.max_backoff if exponent > 62 else min(
            self.max_backoff, self.min_backoff * 2**exponent
        )
        if rng is None:
            return base
        return base * (1 + rng.uniform(-JITTER, JITTER))

    def next_attempt(
        self, now: datetime, attempts: int, rng: random.Random | None = None
    ) -> datetime:
        return now + timedelta(seconds=self.delay(attempts, rng))

    def expired(self, received_at: datetime, now: datetime) -> bool:
        """True once a message has been queued longer than max_lifetime."""
        return now - received_at >= timedelta(seconds=self.max_lifetime)
