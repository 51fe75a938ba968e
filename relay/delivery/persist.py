"""Writing a delivery's result while the database is away.

Owns `until_stored`: a queue write the scheduler must not lose (an attempt's
record, a claim given back) is tried again, with a growing pause, until the
database takes it, the scheduler stops, or the claim's lease has run out (by
then another claim may hold the message, and the lease frees it anyway).
One log line when it starts failing and one when it recovers, not one per try.
Refuses deciding anything about the delivery (`outcomes.py`) and the SQL
(`relay.queue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger("relay.delivery.scheduler")

T = TypeVar("T")

FIRST_PAUSE = 0.5
MAX_PAUSE = 10.0


async def until_stored(write: Callable[[], Awaitable[T]], what: str, halt: asyncio.Event,
                       give_up_after: float, *, first_pause: float = FIRST_PAUSE,
                       now: Callable[[], float] = time.monotonic) -> T | None:
    """`await write()` until it succeeds; None if `halt` is set or
    `give_up_after` seconds pass first (the failure is logged)."""
    deadline = now() + give_up_after
    pause = first_pause
    failed: Exception | None = None
    while True:
        try:
            result = await write()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if failed is None:
                log.error("%s: not stored, will try again while the database is away: %s",
                          what, _one_line(exc))
            failed = exc
        else:
            if failed is not None:
                log.info("%s: stored, the database answers again", what)
            return result
        if halt.is_set() or now() >= deadline:
            log.error("%s: given up (%s); the claim's lease returns the message",
                      what, "stopping" if halt.is_set() else "lease over")
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(halt.wait(), min(pause, max(0.0, deadline - now())))
        pause = min(pause * 2, MAX_PAUSE)


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__
