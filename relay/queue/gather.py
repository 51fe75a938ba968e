"""Commit gathering: messages on their way to the writer, and how long it waits for them.

Owns one count, the SMTP sessions of this process inside a mail
transaction (from MAIL FROM's 250) whose message has not yet been handed to
the writer (`Arrival`), and the writer's rule for a short wait before a
group commit, as PostgreSQL's commit_delay/commit_siblings: while some are
on their way, the writer waits for them up to `delay` (measured from its
first wait for this commit), so one commit, one round trip and one WAL
flush carry more messages. Nobody on the way: no wait, and no clock read.
The wait comes before the commit: no 250 is sent before its message's
commit is durable. The count is kept on the event loop's thread only.
Refuses SQL and threads (`writer.py` waits) and SMTP (`relay.smtp` says
when a transaction starts and ends, and `Shared.store` when a message is
handed over).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Gathering:
    """How many messages are on their way (counted by the event loop's thread,
    read by the writer's: one int, no lock) and the longest wait for them."""

    __slots__ = ("_now", "delay", "on_the_way", "waits")

    def __init__(self, delay: float = 0.0, now: Callable[[], float] = time.monotonic) -> None:
        self.delay = delay  # seconds; 0 = never wait (queue.commit_delay)
        self.on_the_way = 0
        self.waits = 0  # commits that waited (for tests and benchmarks)
        self._now = now

    def arriving(self) -> Arrival:
        """One session's mail transaction has started: its message may come soon."""
        self.on_the_way += 1
        return Arrival(self)

    def deadline(self) -> float | None:
        """When a writer with nothing left in its inbox stops waiting: None
        at once (nobody on the way, or no delay), else `delay` from now."""
        if self.on_the_way <= 0 or self.delay <= 0:
            return None
        self.waits += 1
        return self._now() + self.delay

    def left(self, deadline: float) -> float:
        """Seconds still to wait for `deadline`; 0 once nobody is on the way."""
        if self.on_the_way <= 0:
            return 0.0
        return deadline - self._now()


class Arrival:
    """One session's message on its way: `end` once handed to the writer, or
    once its transaction ends without one (RSET, refused, client gone); a
    second `end` is a no-op."""

    __slots__ = ("_gathering",)

    def __init__(self, gathering: Gathering | None) -> None:
        self._gathering = gathering

    def end(self) -> None:
        gathering, self._gathering = self._gathering, None
        if gathering is not None:
            gathering.on_the_way -= 1


NO_ARRIVAL = Arrival(None)  # a session outside a mail transaction: nothing to end
