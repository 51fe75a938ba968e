"""The one writer of the queue: group commit, other writes in order, WAL checkpoints.

Owns the loop that takes write requests in arrival order, applies runs of
consecutive puts and recorded attempts as one group commit (`Queue.apply`:
one transaction, one fsync), runs any other Queue method alone, and answers
each request; and the thread that checkpoints SQLite's WAL. Every SQLite
statement gives the GIL up and must get it back from a busy event loop, so
the fewer statements per commit the better (see `writes.py`). Refuses asyncio
and SQL of its own: `store.py` speaks to the event loop, the queue's parts
(`access.Queue`) to the database.
"""

from __future__ import annotations

import logging
import queue as threadqueue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from relay.queue import db
from relay.queue.access import Queue
from relay.queue.gather import Gathering
from relay.queue.rows import Attempt, NewMessage, QueueError, Recorded
from relay.queue.sql import one_line

log = logging.getLogger("relay.queue.writer")

MAX_BATCH = 256
CHECKPOINT_INTERVAL = 0.2  # seconds between WAL checkpoints while writes go on


@dataclass(frozen=True, slots=True)
class Request:
    """A write for the writer: an op to group-commit, or a Queue method call."""

    key: int  # the caller's handle for the answer
    op: NewMessage | Attempt | None = None
    method: str = ""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Answer:
    key: int
    value: Any = None
    error: BaseException | None = None


STOP = None  # sent instead of a Request: finish what came before, then stop


class Inbox(Protocol):
    def get(self) -> Request | None:
        """The next request (blocking); STOP to end."""

    def get_nowait(self) -> Request | bool | None:
        """The next request, STOP, or False when none is waiting."""

    def get_within(self, timeout: float) -> Request | bool | None:
        """The next request, STOP, or False when none came within `timeout` seconds."""


class QueueInbox:
    """Requests from other threads of this process, through a thread-safe queue."""

    def __init__(self) -> None:
        self.jobs: threadqueue.SimpleQueue[Request | None] = threadqueue.SimpleQueue()

    def get(self) -> Request | None:
        return self.jobs.get()

    def get_nowait(self) -> Request | bool | None:
        try:
            return self.jobs.get_nowait()
        except threadqueue.Empty:
            return False

    def get_within(self, timeout: float) -> Request | bool | None:
        try:
            return self.jobs.get(timeout=timeout)
        except threadqueue.Empty:
            return False


def write_loop(
    queue: Queue, inbox: Inbox, answer: Callable[[list[Answer]], None],
    wrote: Callable[[], None] = lambda: None, gathering: Gathering | None = None,
) -> None:
    """Serve requests until STOP; `wrote` is told after every transaction;
    `gathering` says which messages are on their way to a group commit."""
    with queue.holding_connection():
        _serve(queue, inbox, answer, wrote, gathering or Gathering())


def _serve(
    queue: Queue, inbox: Inbox, answer: Callable[[list[Answer]], None],
    wrote: Callable[[], None], gathering: Gathering,
) -> None:
    pending: Request | None = None
    while True:
        request = pending if pending is not None else inbox.get()
        pending = None
        if request is STOP:
            return
        if request.op is None:
            answer([_call(queue, request)])
            wrote()
            continue
        batch = [request]
        stop = False
        wait = _Wait(inbox, gathering)
        while len(batch) < MAX_BATCH:
            nxt = inbox.get_nowait()
            if nxt is False:
                nxt = wait.for_next()
                if nxt is False:
                    break
            if nxt is STOP:
                stop = True
                break
            assert isinstance(nxt, Request)
            if nxt.op is None:
                pending = nxt
                break
            batch.append(nxt)
        answer(_commit(queue, batch))
        wrote()
        if stop:
            return


class _Wait:
    """The wait before one group commit, with the inbox empty, for messages
    on their way (`gathering.py`): until a deadline set at its first wait."""

    __slots__ = ("_deadline", "_gathering", "_inbox")

    def __init__(self, inbox: Inbox, gathering: Gathering) -> None:
        self._inbox = inbox
        self._gathering = gathering
        self._deadline: float | None = None

    def for_next(self) -> Request | bool | None:
        """The next request, or False when the commit should go now. The wait
        ends early when a request comes, and for good once nobody is on the way."""
        gathering = self._gathering
        while True:
            if self._deadline is None:
                self._deadline = gathering.deadline()
                if self._deadline is None:
                    return False
            left = gathering.left(self._deadline)
            if left <= 0:
                return False
            nxt = self._inbox.get_within(left)
            if nxt is not False:
                return nxt


def _commit(queue: Queue, batch: list[Request]) -> list[Answer]:
    ops = [request.op for request in batch if request.op is not None]
    try:
        results: list[Recorded | QueueError] = queue.apply(ops)
    except Exception as exc:
        log.warning("group commit of %d writes failed: %s", len(batch), exc)
        failure = exc if isinstance(exc, QueueError) else QueueError(str(exc))
        results = [failure] * len(batch)
    return [
        Answer(request.key, error=result) if isinstance(result, QueueError)
        else Answer(request.key, value=result)
        for request, result in zip(batch, results, strict=True)
    ]


def _call(queue: Queue, request: Request) -> Answer:
    """A database error comes back as a one-line QueueError, as from a group
    commit (a locked or vanished database is routine: no traceback for it)."""
    try:
        value = getattr(queue, request.method)(*request.args, **request.kwargs)
    except SQLAlchemyError as exc:
        return Answer(request.key, error=QueueError(one_line(exc)))
    except Exception as exc:
        return Answer(request.key, error=exc)
    return Answer(request.key, value=value)


class Checkpointer:
    """Checkpoints SQLite's WAL after writes, at most every CHECKPOINT_INTERVAL,
    in a thread of its own: no commit waits for the copy.

    SQLite starts its WAL over from the beginning only at a write transaction
    that finds every frame copied; under steady writes, new frames always
    arrive while a checkpoint runs in the background, so the WAL would grow
    for as long as mail keeps coming, and every commit would extend the file
    (an fsync that must also journal the new size). So once the background
    copy is done, the writer copies the few frames committed meanwhile itself,
    between two transactions (`after_write`): its next one starts the WAL over.
    """

    def __init__(self, queue: Queue) -> None:
        self._engine = queue.engine
        self._wrote = threading.Event()
        self._stopping = threading.Event()
        self._tail_due = False  # set by the checkpointer thread, cleared by the writer
        self._thread = threading.Thread(target=self._loop, name="relay-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def after_write(self) -> None:
        """The writer's part, after each transaction and its answers: copy
        the frames committed while the background copy ran."""
        if self._tail_due:
            self._tail_due = False
            self._checkpoint()
        self._wrote.set()

    def background_round(self) -> None:
        """The thread's part: copy what is committed, without blocking writes."""
        self._checkpoint()
        self._tail_due = True

    def stop(self) -> None:
        self._stopping.set()
        self._wrote.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            self._wrote.wait()
            if self._stopping.is_set():
                return
            self._wrote.clear()
            self.background_round()
            if self._stopping.wait(CHECKPOINT_INTERVAL):
                return

    def _checkpoint(self) -> None:
        try:
            db.checkpoint(self._engine)
        except Exception as exc:  # the next round tries again
            log.warning("WAL checkpoint failed: %s", exc)
