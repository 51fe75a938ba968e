"""The writer loop: runs of writes become one group commit, calls run alone, in order."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest

from relay.queue.gather import Arrival, Gathering
from relay.queue.rows import NewMessage, QueueError
from relay.queue.writer import STOP, Answer, QueueInbox, Request, write_loop


def put(key: int) -> Request:
    return Request(key, op=NewMessage(id=f"M{key}", sender="", recipients=("a@b.example",),
                                      data=b"x\r\n", received_at=datetime(2026, 1, 1, tzinfo=UTC)))


def inbox(*requests: Request | None) -> QueueInbox:
    box = QueueInbox()
    for request in requests:
        box.jobs.put(request)
    return box


class RecordingQueue:
    """Stands in for Queue: records what the writer asked, in order."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    @contextmanager
    def holding_connection(self) -> Iterator[None]:
        self.log.append("hold")
        yield
        self.log.append("let go")

    def apply(self, ops: list[NewMessage]) -> list[bool | QueueError]:
        self.log.append(("apply", [op.id for op in ops]))
        return [QueueError("duplicate") if op.id == "M4" else True for op in ops]

    def flush(self, domain: str) -> int:
        self.log.append(("flush", domain))
        return 7

    def broken(self) -> None:
        raise QueueError("database gone")


def run(*requests: Request | None) -> tuple[RecordingQueue, list[Answer], int]:
    queue = RecordingQueue()
    answers: list[Answer] = []
    transactions = 0

    def wrote() -> None:
        nonlocal transactions
        transactions += 1

    write_loop(queue, inbox(*requests), answers.extend, wrote)  # type: ignore[arg-type]
    return queue, answers, transactions


def test_runs_of_writes_commit_together_and_calls_keep_their_place() -> None:
    queue, answers, transactions = run(
        put(1), put(2), Request(3, method="flush", args=("b.example",)), put(4), put(5), STOP)
    assert queue.log == ["hold", ("apply", ["M1", "M2"]), ("flush", "b.example"),
                         ("apply", ["M4", "M5"]), "let go"]
    assert transactions == 3
    by_key = {a.key: a for a in answers}
    assert by_key[1].value is True and by_key[3].value == 7
    assert isinstance(by_key[4].error, QueueError) and by_key[5].value is True


def test_writes_before_stop_are_committed_and_errors_of_calls_are_answers() -> None:
    queue, answers, _ = run(Request(1, method="broken"), put(2), STOP, put(3))
    assert queue.log == ["hold", ("apply", ["M2"]), "let go"]  # nothing after STOP
    assert isinstance(answers[0].error, QueueError) and answers[1].value is True
    assert [a.key for a in answers] == [1, 2]


class ScriptedInbox(QueueInbox):
    """An inbox whose waits are scripted: each `get_within` takes the next
    step (the request that comes, or None: nothing comes) and lets the fake
    time pass that it waited. Once empty it says STOP."""

    def __init__(self, clock: list[float], steps: list[tuple[float, Any]],
                 *requests: Request | None) -> None:
        super().__init__()
        self.clock = clock
        self.steps = steps
        self.timeouts: list[float] = []
        for request in requests:
            self.jobs.put(request)

    def get(self) -> Request | None:
        nxt = self.get_nowait()
        return None if nxt is False else nxt  # type: ignore[return-value]

    def get_within(self, timeout: float) -> Request | bool | None:
        self.timeouts.append(timeout)
        took, step = self.steps.pop(0)
        self.clock[0] += min(took, timeout)
        return step() if callable(step) else False


def gathered(delay: float, steps: list[tuple[float, Any]], on_the_way: int,
             *requests: Request | None) -> tuple[RecordingQueue, ScriptedInbox, Gathering]:
    clock = [100.0]
    gathering = Gathering(delay, now=lambda: clock[0])
    arrivals = [gathering.arriving() for _ in range(on_the_way)]
    box = ScriptedInbox(clock, [(took, _arrive(step, arrivals)) for took, step in steps],
                        *requests)
    queue = RecordingQueue()
    write_loop(queue, box, lambda answers: None, gathering=gathering)  # type: ignore[arg-type]
    return queue, box, gathering


def _arrive(request: Request | None, arrivals: list[Arrival]) -> Any:
    """The step where the next session on its way hands its message over."""
    if request is None:
        return None

    def step() -> Request:
        arrivals.pop(0).end()
        return request
    return step


def test_messages_on_their_way_join_the_commit_that_waits_for_them() -> None:
    queue, box, gathering = gathered(0.001, [(0.0002, put(2)), (0.0003, put(3))], 2,
                                     put(1))
    assert queue.log == ["hold", ("apply", ["M1", "M2", "M3"]), "let go"]
    assert gathering.waits == 1 and gathering.on_the_way == 0
    assert box.timeouts == pytest.approx([0.001, 0.0008])  # one deadline for the commit


def test_the_wait_for_a_message_that_never_comes_is_bounded() -> None:
    queue, box, gathering = gathered(0.001, [(1.0, None)], 1, put(1))
    assert queue.log == ["hold", ("apply", ["M1"]), "let go"]
    assert box.timeouts == pytest.approx([0.001]) and box.clock[0] == pytest.approx(100.001)
    assert gathering.on_the_way == 1  # still in DATA: the commit went without it


def test_a_writer_with_nobody_on_the_way_commits_at_once() -> None:
    def no_clock() -> float:
        raise AssertionError("the clock is read only to wait")

    gathering = Gathering(10.0, now=no_clock)
    box = ScriptedInbox([0.0], [], put(1), put(2))
    queue = RecordingQueue()
    write_loop(queue, box, lambda answers: None, gathering=gathering)  # type: ignore[arg-type]
    assert queue.log == ["hold", ("apply", ["M1", "M2"]), "let go"]
    assert box.timeouts == [] and gathering.waits == 0


def test_no_delay_means_no_wait_even_with_sessions_in_data() -> None:
    queue, box, gathering = gathered(0.0, [], 3, put(1))
    assert queue.log == ["hold", ("apply", ["M1"]), "let go"]
    assert box.timeouts == [] and gathering.waits == 0


def test_an_arrival_ends_once() -> None:
    gathering = Gathering(0.001)
    arrival = gathering.arriving()
    gathering.arriving()
    arrival.end()
    arrival.end()
    assert gathering.on_the_way == 1
