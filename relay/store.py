"""The event loop's door to the queue: database work in threads, puts group-committed.

Owns the threads that run `Queue` methods so that no SQL blocks the event
loop, and group commit for the accept path: concurrent SMTP sessions' messages
go into one transaction (one fsync), and each session still hears 250 only
after the transaction holding its own message committed. Refuses SQL of its
own: every statement is in `queue.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue as threadqueue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from relay.queue import NewMessage, Queue, QueueError

log = logging.getLogger("relay.store")

T = TypeVar("T")
MAX_BATCH = 256

_Pending = tuple[NewMessage, asyncio.Future[None], asyncio.AbstractEventLoop]


class Store:
    def __init__(self, queue: Queue, workers: int = 2) -> None:
        self.queue = queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="relay-db")
        self._puts: threadqueue.SimpleQueue[_Pending | None] = threadqueue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="relay-commit", daemon=True)
        self._writer.start()
        self._closed = False

    async def put(self, message: NewMessage) -> None:
        """Return once `message` is durably committed; raise QueueError if it is not."""
        if self._closed:
            raise QueueError("queue is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._puts.put((message, future, loop))
        await future

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Queue method in a database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        """Finish pending puts, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._puts.put(None)
        self._writer.join()
        self._executor.shutdown(wait=True)

    def _write_loop(self) -> None:
        while True:
            first = self._puts.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._puts.get_nowait()
                except threadqueue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            self.queue.put_many([m for m, _, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            log.warning(
                "group commit of %d messages failed (%s); retrying one by one", len(batch), exc
            )
            for item in batch:
                self._commit([item])
            return
        for item in batch:
            _settle(item, None)


def _settle(item: _Pending, error: BaseException | None) -> None:
    _, future, loop = item

    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error if isinstance(error, QueueError) else QueueError(str(error)))

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the answer
        loop.call_soon_threadsafe(settle)
