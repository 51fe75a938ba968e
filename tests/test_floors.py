"""The lower bounds in pyproject.toml are true: the code works with every
dependency at its floor (`constraints/floors.txt`).

Builds a venv with those pins once (kept under `.venv/floors-<hash>`, keyed
by the constraints and pyproject.toml, so a rerun costs only the test run)
and runs the unit tests, plus the component tests that lean hardest on a
library's behaviour (aiosmtplib's client, aiohttp's server, prometheus'
exposition), in it. Refuses to run when the package index cannot be reached
outside CI: it skips with the reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ROOT / "constraints" / "floors.txt"
# Extras the floors venv leaves out: what only a benchmark needs (atheris for
# bench/fuzz.py is a native wheel; the tests never import it).
NOT_TESTED_EXTRAS = ("fuzz",)
RUN = [
    "tests/unit",
    "tests/component/test_transport.py",
    "tests/component/test_metrics.py",
    "-k", "not postgresql",
    # The committed man pages are click's help as the newest click words it;
    # whether they are current is checked by the main run, not at the floors.
    "--deselect", "tests/unit/test_docs_current.py::test_generated_docs_are_current",
]
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def declared_floors() -> dict[str, str]:
    """name -> lower bound, of every dependency and extra in pyproject.toml."""
    project = _project()
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    floors = {}
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        assert match, f"pyproject.toml: {requirement!r} has no lower bound"
        floors[_name(match[1])] = match[2]
    return floors


def pinned() -> dict[str, str]:
    pins = {}
    for line in FLOORS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    return pins


def test_floors_file_pins_every_declared_lower_bound() -> None:
    """Each pin is the floor pyproject.toml declares (a release that exists, so
    `>=3.1` is pinned and declared as the first one there is, not a fiction)."""
    declared = declared_floors()
    pins = pinned()
    assert set(declared) <= set(pins), set(declared) - set(pins)
    for name, floor in declared.items():
        assert Version(pins[name]) == Version(floor), (
            f"{name}: pyproject.toml says >={floor}, floors.txt {pins[name]}")


def _floors_venv() -> Path:
    key = hashlib.sha256(FLOORS.read_bytes() + (ROOT / "pyproject.toml").read_bytes())
    home = ROOT / ".venv" / f"floors-{key.hexdigest()[:16]}"
    python = home / "bin" / "python"
    if (home / "ready").exists():
        return python
    shutil.rmtree(home, ignore_errors=True)
    venv.create(home, with_pip=True)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-c", str(FLOORS), "-e", f"{ROOT}[test,postgresql]"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    if install.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        message = f"pip install -c {FLOORS.name} failed:\n{install.stdout}{install.stderr}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message[-2000:])
    (home / "ready").write_text("")
    return python


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_suite_passes_with_every_dependency_at_its_floor() -> None:
    python = _floors_venv()
    versions = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True,
                              text=True, check=True).stdout
    installed = {_name(n): v for n, _, v in (line.partition("==") for line in versions.split())}
    bench_only = {_name(r.split(">=")[0]) for extra in NOT_TESTED_EXTRAS
                  for r in _project()["optional-dependencies"][extra]}
    for name, version in pinned().items():
        if name in bench_only:
            continue
        assert Version(installed.get(name, "0")) == Version(version), (
            f"{name}: {installed.get(name)} installed, {version} pinned")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PYTEST_"))}
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *RUN],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, f"at the floors:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"

