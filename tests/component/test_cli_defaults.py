"""No config file found: every command says so on stderr; `relay serve` hosting
no domain refuses to start (SPEC Part 2 "Operating it day to day")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from relay.ops.cli.main import main_group

NOTE = ("relay: no config file (tried -c, $RELAY_CONFIG, config/relay.toml); "
        "using built-in defaults")


@pytest.fixture(autouse=True)
def empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.delenv("RELAY_QUEUE_URL", raising=False)
    monkeypatch.delenv("RELAY_LISTEN", raising=False)
    return tmp_path


def run(*args: str) -> Result:
    return CliRunner().invoke(main_group, list(args), catch_exceptions=False)


def test_a_command_without_a_config_file_says_so(empty_dir: Path) -> None:
    result = run("check-config")
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [NOTE]
    assert result.stdout.startswith("# <defaults>: ok")


@pytest.mark.parametrize("where", ["-c", "env", "config/relay.toml"])
def test_a_config_file_found_any_way_is_used_silently(
    empty_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path = empty_dir / "config" / "relay.toml"
    path.parent.mkdir()
    path.write_text('[node]\nhostname = "mail.verrotech.net"\n')
    args: tuple[str, ...] = ()
    if where == "-c":
        args = ("-c", str(path))
    elif where == "env":
        monkeypatch.setenv("RELAY_CONFIG", str(path))
    result = run(*args, "check-config")
    assert (result.exit_code, result.stderr) == (0, "")
    assert '"hostname": "mail.verrotech.net"' in result.stdout


def test_serve_without_a_config_file_refuses_to_start() -> None:
    result = run("serve")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        NOTE,
        'relay: no domain is hosted: give a config file with a [domains."example.com"] table',
    ]


def test_serve_with_a_config_hosting_no_domain_refuses_to_start(empty_dir: Path) -> None:
    path = empty_dir / "relay.toml"
    path.write_text(f'[queue]\nurl = "sqlite:///{empty_dir}/queue.db"\n')
    result = run("-c", str(path), "serve")
    assert result.exit_code == 1
    assert result.stderr == (
        f'relay: no domain is hosted: add a [domains."example.com"] table to {path}\n')
    assert not (empty_dir / "queue.db").exists()  # refused before touching anything


@pytest.mark.slow
def test_the_console_script_refuses_too(empty_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "relay", "serve"], capture_output=True,
                            text=True, cwd=empty_dir, timeout=60, check=False,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == NOTE
    assert "Traceback" not in result.stderr
