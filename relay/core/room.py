"""Room to work in: free space on the queue's file system and the memory of
messages being received.

Owns two cheap checks the accept side makes on its hot path: `FreeSpace`
(os.statvfs of the queue file's directory, or of its nearest existing parent,
read at most once per `interval`)
and `Budget` (an integer of bytes held for DATA by all sessions together).
Refuses replies and metrics (`relay.smtp`), and knowing where the queue is
(it is handed a directory, or none for PostgreSQL, whose disk is not ours).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("relay.room")

SHORT_OF_SPACE = "452 4.3.1 Insufficient system storage"
SHORT_OF_MEMORY = "451 4.3.1 Insufficient system resources"


class FreeSpace:
    """Whether the queue's file system has at least `minimum` bytes free.

    statvfs costs a system call: its answer is kept for `interval` seconds of
    `now`, so a busy listener asks the kernel about once a second.
    """

    def __init__(self, directory: Path | None, minimum: int, interval: float = 1.0,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.minimum = minimum
        self._interval = interval
        self._now = now
        self._checked = -float("inf")
        self._short: str | None = None

    def problem(self) -> str | None:
        """None while there is room; else one line saying what is short."""
        if self.directory is None or self.minimum <= 0:
            return None
        now = self._now()
        if now - self._checked >= self._interval:
            self._checked = now
            short = self._measure()
            if (short is None) != (self._short is None):  # one line per change, not per check
                if short is None:
                    log.info("queue file system %s has room again: accepting mail",
                             self.directory)
                else:
                    log.warning("%s: MAIL FROM gets 452 4.3.1 until space returns", short)
            self._short = short
        return self._short

    def _measure(self) -> str | None:
        directory = self.directory
        assert directory is not None  # problem() returned first
        while not directory.exists() and directory.parent != directory:
            directory = directory.parent  # not made yet: the file system it will be on
        try:
            stat = os.statvfs(directory)
        except OSError as exc:
            return f"queue file system {self.directory}: cannot check free space: {exc.strerror}"
        free = stat.f_bavail * stat.f_frsize
        if free >= self.minimum:
            return None
        return (f"queue file system {self.directory} is short of space: {free} bytes free, "
                f"queue.min_free_space is {self.minimum}")


class Budget:
    """Bytes of DATA held in memory by all sessions together, within `limit`."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        """Count `size` more bytes in, if they fit."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size
