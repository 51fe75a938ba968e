"""config/mx-relay.service and its template mx-relay@.service: what systemd
will accept, and the settings operators rely on.

`systemd-analyze verify` checks the unit where it is installed (it prints a
warning for an unknown key or a bad value and still exits 0, so its output
must be empty); the settings below are checked everywhere.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.core.config import SmtpConfig
from relay.service import SHUTDOWN_GRACE

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "config" / "mx-relay.service"
TEMPLATE = REPO / "config" / "mx-relay@.service"
INSTALLED_RELAY = "/opt/mx-relay/bin/relay"


def settings(unit: Path = UNIT) -> dict[str, list[str]]:
    """`Section.Key` -> values in order (systemd keys may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def one(key: str) -> str:
    values = settings()[key]
    assert len(values) == 1, key
    return values[0]


def _seconds(value: str) -> float:
    assert value.endswith("s") and value[:-1].isdigit(), value
    return float(value[:-1])


def test_runs_relay_serve_as_a_dedicated_user() -> None:
    assert one("Service.ExecStart") == f"{INSTALLED_RELAY} serve"
    assert one("Service.User") == "relay"
    assert one("Service.Environment") == "RELAY_CONFIG=/etc/relay/relay.toml"
    assert one("Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Service.Restart") == "on-failure"
    assert one("Install.WantedBy") == "multi-user.target"


def test_stop_timeout_covers_both_shutdown_graces() -> None:
    graces = SmtpConfig().shutdown_grace + SHUTDOWN_GRACE
    assert _seconds(one("Service.TimeoutStopSec")) >= graces + 5


def test_hardening() -> None:
    s = settings()
    assert one("Service.NoNewPrivileges") == "yes"
    assert one("Service.ProtectSystem") == "strict"
    assert one("Service.ReadWritePaths") == "/var/lib/relay"
    assert one("Service.StateDirectory") == "relay"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "RestrictNamespaces"):
        assert one(f"Service.{key}") == "yes", key
    assert one("Service.AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("Service.CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert set(one("Service.RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in s["Service.SystemCallFilter"]


def test_the_template_runs_each_instance_as_the_unit_runs_relay_serve() -> None:
    """mx-relay@N differs from mx-relay.service only in its name and its config
    file: the same hardening, stop timeout and reload."""
    single, template = settings(UNIT), settings(TEMPLATE)
    assert template.pop("Service.Environment") == ["RELAY_CONFIG=/etc/relay/relay@%i.toml"]
    assert single.pop("Service.Environment") == ["RELAY_CONFIG=/etc/relay/relay.toml"]
    assert template.pop("Unit.Description")[0].endswith("node %i")
    single.pop("Unit.Description")
    assert template == single


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize(("source", "name"), [(UNIT, "mx-relay.service"),
                                              (TEMPLATE, "mx-relay@1.service")])
def test_systemd_analyze_verify_is_silent(tmp_path: Path, source: Path, name: str) -> None:
    relay = shutil.which("relay") or str(Path(sys.executable).parent / "relay")
    assert Path(relay).is_file()
    unit = tmp_path / name  # the same unit, run from this checkout's relay
    unit.write_text(source.read_text(encoding="utf-8").replace(INSTALLED_RELAY, relay))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
