"""Per-destination concurrency windows: slow start, as Postfix's qmgr does it.

Owns how many sessions one destination may have at once: a window that
starts small, grows by one with each delivery that went through, and halves
when the destination pushes back (421 or 4.7.x "too many connections") or
slows down (a delivery that takes several times as long as its recent
average: a struggling primary should get fewer parallel sessions, not more).
Refuses I/O; the scheduler asks and reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.core.model import DeliveryReport

INITIAL_WINDOW = 5  # Postfix's initial_destination_concurrency
SLOW_FACTOR = 4.0  # a delivery this many times the average counts as a slow-down
SLOW_FLOOR = 2.0  # seconds: quicker deliveries never count as slow
SMOOTHING = 0.2  # weight of the newest duration in the moving average


def pushed_back(report: DeliveryReport) -> bool:
    """True when the destination said "not now, not so many", not "I am down".

    A 421 (anywhere) or a 4.7.x session refusal on every recipient means the
    host is alive but throttling us.
    """
    replies = list(report.replies.values())
    if not replies:
        return False
    return all(r.code == 421 or r.enhanced_status.startswith("4.7.") for r in replies)


@dataclass
class Window:
    limit: int  # delivery.per_destination_concurrency
    size: float = field(default=float(INITIAL_WINDOW))
    average: float | None = None  # seconds per delivery, moving average

    def __post_init__(self) -> None:
        self.size = min(self.size, float(self.limit))

    @property
    def sessions(self) -> int:
        return max(1, int(self.size))

    def success(self) -> None:
        """A delivery went through: open up by one session (until the limit)."""
        self.size = min(float(self.limit), self.size + 1)

    def push_back(self) -> None:
        """The destination throttled us: halve the window (at least one session)."""
        self.size = max(1.0, self.size / 2)

    def timed(self, seconds: float) -> bool:
        """Account one delivery's duration; True (and the window halved) if it
        shows the destination slowing down."""
        slow = (
            self.average is not None
            and seconds >= SLOW_FLOOR
            and seconds >= SLOW_FACTOR * self.average
        )
        self.average = seconds if self.average is None else (
            (1 - SMOOTHING) * self.average + SMOOTHING * seconds
        )
        if slow:
            self.push_back()
        return slow
