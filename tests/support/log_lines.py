"""Log lines of one logger, collected while a test runs a relay in its own event loop.

Owns waiting for a line without sleeping: each record wakes whoever waits on
`wait(predicate)`, within a deadline. Records may come from other threads (the
writer, the store's readers); they are added on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable


class LogLines(logging.Handler):
    """Every message logged, in order, as text."""

    def __init__(self, level: int = logging.DEBUG, deadline: float = 15.0) -> None:
        super().__init__(level)
        self.loop = asyncio.get_running_loop()
        self.deadline = deadline
        self.lines: list[str] = []
        self.changed = asyncio.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        self.loop.call_soon_threadsafe(self._add, record.getMessage())

    def _add(self, line: str) -> None:
        self.lines.append(line)

        async def notify() -> None:
            async with self.changed:
                self.changed.notify_all()

        self.loop.create_task(notify())

    async def wait(self, predicate: Callable[[], bool]) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), self.deadline)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@contextlib.asynccontextmanager
async def capturing(handler: LogLines, name: str, level: int) -> AsyncIterator[LogLines]:
    """`handler` on logger `name` at `level` for the block; the logger as it was after."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
