"""The writer loop: runs of writes become one group commit, calls run alone, in order."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

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
