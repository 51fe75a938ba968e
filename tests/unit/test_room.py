"""`relay.core.room`: the free-space check (on a real directory) and the DATA budget."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from relay.core.room import Budget, FreeSpace
from relay.smtp.data import DataReceiver


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_short_of_space_is_measured_at_most_once_per_interval(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Ticks()
    room = FreeSpace(tmp_path, free_bytes(tmp_path) * 4 + 2**40, interval=1.0, now=clock)
    with caplog.at_level(logging.INFO, "relay.room"):
        problem = room.problem()
        assert problem is not None and "short of space" in problem and str(tmp_path) in problem
        room.minimum = 1  # plenty now, but the answer is kept for a second
        clock.now = 0.9
        assert room.problem() == problem
        clock.now = 1.0
        assert room.problem() is None
        clock.now = 5.0
        assert room.problem() is None
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]  # one per change


def test_a_queue_directory_not_made_yet_is_measured_on_its_file_system(tmp_path: Path) -> None:
    room = FreeSpace(tmp_path / "not" / "yet", 1)
    assert room.problem() is None
    room = FreeSpace(tmp_path / "not" / "yet", free_bytes(tmp_path) * 4 + 2**40)
    assert room.problem() is not None


def test_no_directory_or_no_minimum_means_no_check(tmp_path: Path) -> None:
    assert FreeSpace(None, 2**62).problem() is None  # PostgreSQL: not our disk
    assert FreeSpace(tmp_path, 0).problem() is None


def test_the_budget_is_shared_and_given_back() -> None:
    budget = Budget(100)
    first, second = DataReceiver(10**6, budget), DataReceiver(10**6, budget)
    assert first.feed(b"a" * 58 + b"\r\n") == -1
    assert budget.used == 60
    assert second.feed(b"b" * 48 + b"\r\n.\r\n") == 53  # 50 more would not fit
    assert second.problem == "451 4.3.1 Insufficient system resources"
    assert second.blocks == [] and budget.used == 60
    first.release()
    assert budget.used == 0
    third = DataReceiver(10**6, budget)
    assert third.feed(b"c" * 48 + b"\r\n.\r\n") == 53
    assert third.problem is None and budget.used == 50
    third.release()
    third.release()  # twice is harmless
    assert budget.used == 0
