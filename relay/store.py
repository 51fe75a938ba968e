"""The event loop's door to the queue: database work in threads, puts group-committed.

Owns the threads that run `Queue` methods so that no SQL blocks the event
loop, and group commit: concurrent SMTP sessions' messages and finished
delivery attempts go into one transaction (one fsync), and each session
still hears 250 only after the transaction holding its own message committed. Refuses SQL of its
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
from dataclasses import dataclass
from typing import Any, TypeVar

from relay import db
from relay.queue import Attempt, NewMessage, Queue, QueueError

log = logging.getLogger("relay.store")

T = TypeVar("T")
MAX_BATCH = 256
CHECKPOINT_INTERVAL = 0.2  # seconds between WAL checkpoints while writes go on

_Op = NewMessage | Attempt


@dataclass(slots=True)
class _Job:
    """One request to the writer thread: a batched op, or any Queue call."""

    op: _Op | None
    call: Callable[[], Any] | None
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class Store:
    """Writes run in ONE thread (SQLite has one writer; in-process lock
    contention would put threads to sleep in SQLite's busy handler); reads run
    in a small pool, since WAL readers never wait for the writer."""

    def __init__(self, queue: Queue, readers: int = 2, checkpoints: bool = False) -> None:
        """`checkpoints`: the engine leaves WAL checkpoints to us (see
        `db.connect`); a thread of ours runs them, off the commit path."""
        self.queue = queue
        self._executor = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="relay-db")
        self._jobs: threadqueue.SimpleQueue[_Job | None] = threadqueue.SimpleQueue()
        self._wrote = threading.Event()
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="relay-writer", daemon=True)
        self._writer.start()
        self._checkpointer: threading.Thread | None = None
        if checkpoints:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="relay-checkpoint", daemon=True
            )
            self._checkpointer.start()
        self._closed = False

    async def put(self, message: NewMessage) -> None:
        """Return once `message` is durably committed; raise QueueError if it is not."""
        await self._submit(message, None)

    async def record(self, attempt: Attempt) -> bool:
        """Record a delivery attempt, group-committed with other writes."""
        return bool(await self._submit(attempt, None))

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Queue method that writes, in the writer thread, in order."""
        result: T = await self._submit(None, lambda: fn(*args, **kwargs))
        return result

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Queue method that only reads, in the reader pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def _submit(self, op: _Op | None, call: Callable[[], Any] | None) -> Any:
        if self._closed:
            raise QueueError("queue is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put(_Job(op, call, future, loop))
        return await future

    def close(self) -> None:
        """Finish pending writes, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._writer.join()
        self._stopping.set()
        self._wrote.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        self._executor.shutdown(wait=True)

    def _checkpoint_loop(self) -> None:
        """Checkpoint after writes, at most every CHECKPOINT_INTERVAL: the WAL
        stays small, and no client waits for the copy."""
        while True:
            self._wrote.wait()
            if self._stopping.is_set():
                return
            self._wrote.clear()
            try:
                db.checkpoint(self.queue.engine)
            except Exception as exc:  # the next round tries again
                log.warning("WAL checkpoint failed: %s", exc)
            if self._stopping.wait(CHECKPOINT_INTERVAL):
                return

    def _write_loop(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending if pending is not None else self._jobs.get()
            pending = None
            if job is None:
                return
            if job.call is not None:
                _run(job)
                self._wrote.set()
                continue
            batch = [job]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._jobs.get_nowait()
                except threadqueue.Empty:
                    break
                if nxt is None or nxt.call is not None:
                    pending = nxt
                    if nxt is None:
                        self._commit(batch)
                        return
                    break
                batch.append(nxt)
            self._commit(batch)
            self._wrote.set()

    def _commit(self, batch: list[_Job]) -> None:
        try:
            results: list[bool | QueueError] = self.queue.apply(
                [job.op for job in batch if job.op is not None]
            )
        except Exception as exc:
            log.warning("group commit of %d writes failed: %s", len(batch), exc)
            failure = exc if isinstance(exc, QueueError) else QueueError(str(exc))
            results = [failure] * len(batch)
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, QueueError):
                _settle(job, error=result)
            else:
                _settle(job, value=result)


def _run(job: _Job) -> None:
    assert job.call is not None
    try:
        value = job.call()
    except BaseException as exc:
        _settle(job, error=exc)
    else:
        _settle(job, value=value)


def _settle(job: _Job, value: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(value)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the answer
        job.loop.call_soon_threadsafe(settle)
