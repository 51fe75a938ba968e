"""The code passes its own checkers: `ruff check`, and `mypy` on `relay/`, reached through pytest.

`.ci/run` runs exactly the README's test command, so whatever CI must check
is a test. Refuses to fix anything: it reports ruff's own output.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINTED = ("relay", "tests", "bench", "migrations")


def test_ruff_check_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", *LINTED],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"ruff check {' '.join(LINTED)}:\n{result.stdout}{result.stderr}"


def test_mypy_is_clean() -> None:
    """pyproject's [tool.mypy] names what is checked (relay/) and how."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, f"mypy:\n{result.stdout}{result.stderr}"
