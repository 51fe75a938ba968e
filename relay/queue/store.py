"""The event loop's door to the queue: writes to the one writer, reads to threads.

Owns the bridge between asyncio and the database threads: every write goes
to the writer thread (`writer.py`: group commit, so each SMTP session still
hears 250 only after the transaction holding its own message committed);
reads run in a small thread pool, since WAL readers never wait for the
writer; and whether the writer can commit at all (`write_problem`: SQLite's
write lock held by another process, for `/healthz`). Refuses SQL of its own:
every statement is in the queue's parts (`access.Queue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from relay.queue import db, writer
from relay.queue.access import Queue
from relay.queue.gather import Gathering
from relay.queue.rows import Attempt, NewMessage, QueueError, Recorded
from relay.queue.writer import Answer, Checkpointer, QueueInbox, Request

log = logging.getLogger("relay.queue.store")

T = TypeVar("T")

LOCKED = "database is locked"  # SQLite's words when its busy timeout ran out


def _locked(error: BaseException | None) -> bool:
    return error is not None and LOCKED in str(error)


class Store:
    """Writes go to ONE writer (SQLite has one writer; several would put each
    other to sleep in SQLite's busy handler); reads run in a small pool."""

    def __init__(self, queue: Queue, readers: int = 2,
                 gathering: Gathering | None = None) -> None:
        """WAL checkpoints run here when the engine leaves them to its caller
        (`db.connect(background_checkpoints=True)`). `gathering`: the messages
        on their way (the SMTP sessions count themselves in) and how long the
        writer may wait for them before a group commit (none: no wait)."""
        checkpoints = db.checkpoints_left_to_caller(queue.engine)
        self.queue = queue
        self.gathering = gathering or Gathering()
        self._executor = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="relay-db")
        self._keys = itertools.count()
        self._waiting: dict[int, tuple[asyncio.Future[Any], asyncio.AbstractEventLoop]] = {}
        self._writer = _WriterThread(queue, checkpoints, self._settle, self.gathering)
        self._closed = False
        self._locked = False  # the last write failed on the lock; none committed since
        self._probe: asyncio.Future[Any] | None = None

    def put(self, message: NewMessage) -> asyncio.Future[None]:
        """A future done once `message` is durably committed; QueueError if it
        is not. A future rather than a coroutine: an SMTP session awaits it
        shielded, and a task around it would cost the event loop two more
        turns before every 250."""
        return self._send(op=message)

    async def record(self, attempt: Attempt) -> Recorded:
        """Record a delivery attempt, group-committed with other writes; STALE
        when its claim no longer holds the message's lease (refused)."""
        result: Recorded = await self._send(op=attempt)
        return result

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Queue method that writes, in the writer, in order."""
        name = getattr(fn, "__name__", "")
        if getattr(self.queue, name, None) != fn:  # it goes by name to the writer
            raise TypeError(f"{fn!r} is not a method of this store's queue")
        result: T = await self._send(method=name, args=args, kwargs=kwargs)
        return result

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Queue method that only reads, in the reader pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _send(self, op: NewMessage | Attempt | None = None, method: str = "",
              args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
              ) -> asyncio.Future[Any]:
        """Hand a request to the writer; the future of its answer."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(QueueError("queue is closed"))
            return future
        key = next(self._keys)
        self._waiting[key] = (future, loop)
        self._writer.send(Request(key, op, method, args, kwargs or {}))
        return future

    def close(self) -> None:
        """Finish pending writes, then stop the writer and the readers."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._executor.shutdown(wait=True)
        for key in list(self._waiting):  # nothing should be left; if so, say so
            self._settle([Answer(key, error=QueueError("the queue writer stopped"))])

    @property
    def checkpointing(self) -> bool:
        """Whether WAL checkpoints are running (for tests and health)."""
        return self._writer.checkpointing

    async def write_problem(self, timeout: float) -> str | None:
        """None while writes commit; "database locked" after a write failed on
        a lock another process holds, until a probe through the writer (an empty
        write transaction, at most one at a time, waited for up to `timeout`)
        finds the lock gone. A database that does not answer at all is the
        read ping's to report (`/healthz`)."""
        if not self._locked:
            return None
        if self._probe is None or self._probe.done():
            self._probe = self._send(method="write_ping")
            self._probe.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), timeout)
        except TimeoutError:
            return "database locked"
        except Exception as exc:
            return "database locked" if _locked(exc) else None
        return None

    def _settle(self, answers: list[Answer]) -> None:
        """Called from the writer's side: wake the callers in their loops, with
        one call per loop for the whole batch (one wake-up, not one per answer)."""
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if any(_locked(answer.error) for answer in answers):
            self._locked = True
        elif any(answer.error is None for answer in answers):
            self._locked = False
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Answer]]] = {}
        for answer in answers:
            waiting = self._waiting.pop(answer.key, None)
            if waiting is not None:
                future, loop = waiting
                by_loop.setdefault(loop, []).append((future, answer))
        for loop, settled in by_loop.items():
            if loop is current:
                _settle_futures(settled)
                continue
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it
                loop.call_soon_threadsafe(_settle_futures, settled)


def _settle_futures(settled: list[tuple[asyncio.Future[Any], Answer]]) -> None:
    for future, answer in settled:
        if future.done():
            continue
        if answer.error is not None:
            future.set_exception(answer.error)
        else:
            future.set_result(answer.value)


class _WriterThread:
    """The writer's thread, fed through a thread-safe queue."""

    def __init__(self, queue: Queue, checkpoints: bool,
                 settle: Callable[[list[Answer]], None], gathering: Gathering) -> None:
        self._inbox = QueueInbox()
        self._checkpointer = Checkpointer(queue) if checkpoints else None
        wrote = self._checkpointer.after_write if self._checkpointer else lambda: None
        if self._checkpointer is not None:
            self._checkpointer.start()
        self._thread = threading.Thread(
            target=writer.write_loop, args=(queue, self._inbox, settle, wrote, gathering),
            name="relay-writer", daemon=True,
        )
        self._thread.start()

    def send(self, request: Request) -> None:
        self._inbox.jobs.put(request)

    def close(self) -> None:
        self._inbox.jobs.put(writer.STOP)
        self._thread.join()
        if self._checkpointer is not None:
            self._checkpointer.stop()

    @property
    def checkpointing(self) -> bool:
        return self._checkpointer is not None and self._checkpointer.running
