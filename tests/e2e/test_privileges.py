"""End to end: `node.user` (SPEC Part 2) and a queue kept to its owner.

`relay serve` started as root in the reference deployment with
`node.user = "nobody"`: the kernel's view of the running process
(/proc/PID/status) shows nobody's ids in all four fields and nobody's groups
only; the queue files belong to nobody with mode 0600; mail is accepted and
delivered after the drop. A user that does not exist refuses the start.
The queue lives in a directory of its own under /tmp that nobody can reach
(pytest's tmp_path is root's alone).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.deployment import PRIMARY, Deployment, message

pytestmark = pytest.mark.slow

SENDER = "s@sender.example"
ALICE = "alice@verrotech.com"
USER = "nobody"


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory `nobody` may pass through, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs a relay started as root")
    base = Path(tempfile.mkdtemp(prefix="mx-relay-privs-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def status_fields(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups of a process as the kernel reports them."""
    fields: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
    return fields


def test_root_drops_to_node_user_after_binding_and_still_delivers(
        deployment: Deployment, reachable_dir: Path) -> None:
    nobody = pwd.getpwnam(USER)
    groups = sorted(set(os.getgrouplist(USER, nobody.pw_gid)))
    database = reachable_dir / "spool" / "queue.db"  # the relay creates spool/
    deployment.write_config(node={"user": USER}, queue={"url": f"sqlite:///{database}"})
    primary = deployment.sink(PRIMARY)
    relay = deployment.relay().start()
    assert relay.count(rf"dropped privileges to {USER} \(uid {nobody.pw_uid}, "
                       rf"gid {nobody.pw_gid}\)") == 1
    assert relay.proc is not None
    seen = status_fields(relay.proc.pid)
    assert seen["Uid"] == [nobody.pw_uid] * 4  # real, effective, saved, file system
    assert seen["Gid"] == [nobody.pw_gid] * 4
    assert sorted(seen["Groups"]) == groups  # root's groups are gone

    queued = deployment.send(SENDER, [ALICE], message(1))
    got = primary.wait_for_messages(1)
    assert [(m.sender, m.recipients) for m in got] == [(SENDER, (ALICE,))]
    relay.wait_for(rf"{queued}: delivered ")

    files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    for path in files:
        info = path.stat()
        assert (path.name, info.st_uid, info.st_gid) == (path.name, nobody.pw_uid,
                                                         nobody.pw_gid)
        assert (path.name, stat.S_IMODE(info.st_mode)) == (path.name, 0o600)
    assert database.parent.stat().st_uid == nobody.pw_uid  # it made the directory
    assert relay.terminate() == 0
    assert relay.count("Traceback") == 0


def test_a_user_that_does_not_exist_refuses_the_start(deployment: Deployment) -> None:
    config = deployment.write_config(node={"user": "no-such-user-mx"})
    result = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "serve"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr == f"{config}: node.user: no such user 'no-such-user-mx'\n"
    checked = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "check-config"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert (checked.returncode, checked.stderr) == (1, result.stderr)
