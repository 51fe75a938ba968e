"""How long a client may take: the DATA deadline and the whole-session cap.

Owns the arithmetic that cuts slowloris clients: `DataDeadline` (Postfix's
`smtpd_per_request_deadline` with `smtpd_min_data_rate`: inside DATA the
client starts with `smtp.data_timeout`, every read of N bytes adds
N / `smtp.min_data_rate` seconds, and the time left never exceeds
`data_timeout`; so a client dripping a byte every few seconds runs out while
a slow but steady one does not) and `SessionCap` (`smtp.max_session_time`: a
client that keeps a connection busy with a command now and then is still
closed after that long). A command line is bounded by aiosmtpd's own timer,
which only a complete, recognised command restarts: the line must arrive
within `command_timeout` of our previous reply, whatever it trickles.

Refuses I/O: the session (`server.py`) reads the clock, says the `421 4.4.2`
and closes the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class DataDeadline:
    """When the DATA being received runs out of time (`at`), by the loop's clock."""

    at: float
    timeout: float
    min_rate: int

    @classmethod
    def starting(cls, now: float, timeout: float, min_rate: int) -> DataDeadline:
        return cls(now + timeout, timeout, min_rate)

    def fed(self, now: float, size: int) -> None:
        """`size` bytes arrived at `now`: earn time for them (or, without a
        minimum rate, start the idle timeout over)."""
        if self.min_rate <= 0:
            self.at = now + self.timeout
        else:
            self.at = min(self.at + size / self.min_rate, now + self.timeout)

    def left(self, now: float) -> float:
        return self.at - now


class SessionCap:
    """Calls `expire` once `limit` seconds after the connection was made
    (never with a limit of 0), unless the session ended first; if the session
    is `busy` with a message then, only `expired` is set and the session
    calls `expire` itself after that message's reply."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float,
                 expire: Callable[[], None], busy: Callable[[], bool]) -> None:
        self.expired = False
        self._expire = expire
        self._busy = busy
        self._handle = loop.call_later(limit, self._fire) if limit > 0 else None

    def _fire(self) -> None:
        self._handle = None
        self.expired = True
        if not self._busy():
            self._expire()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
