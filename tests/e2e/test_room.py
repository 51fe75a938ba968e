"""End to end: running out of room (SPEC "Running out of room").

`relay serve` as a subprocess in the reference deployment, with its SQLite
queue on a small file system of its own (a 20 MB tmpfs the fixture mounts;
skipped where mounting is not permitted) filled until `MAIL FROM` hears
`452 4.3.1`, and on a queue whose write lock another process holds. Each
test ends by checking that every acknowledged message is still there and
is delivered. A PostgreSQL server private to one test is stopped and
started again under a running relay with a delivery in progress.
Synchronisation is by events (log lines, sink deliveries) and
by asking `/healthz` until it answers as expected, within a deadline.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.deployment import PRIMARY, RELAY, Deployment, message
from tests.support.postgres import (
    PostgresServer,
    Unavailable,
    create_database,
    ensure_binaries,
    needs_postgres,
)
from tests.support.relay_process import free_port

pytestmark = pytest.mark.slow

SENDER = "s@sender.example"
ALICE = "alice@verrotech.com"
FS_SIZE = 20 * 1024 * 1024
MIN_FREE = 6 * 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs of its own, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the queue needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), error.read().decode()


def healthz_until(port: int, status: int, timeout: float = 10.0) -> str:
    """Ask `/healthz` until it answers `status` (its free-space answer is kept
    for a second); the body of that answer."""
    deadline = time.monotonic() + timeout
    while True:
        code, text = healthz(port)
        if code == status:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz still {code} {text!r}, not {status}")
        time.sleep(0.1)  # polling a condition within a deadline, not ordering events


def mail_from(deployment: Deployment) -> tuple[int, str]:
    with smtplib.SMTP(RELAY, deployment.relay_port, timeout=10) as client:
        client.ehlo("client.sender.example")
        code, reply = client.mail(SENDER)
        return code, reply.decode()


def test_a_full_queue_file_system_refuses_mail_until_space_returns(
        deployment: Deployment, small_fs: Path) -> None:
    metrics_port = free_port("127.0.0.1")
    deployment.write_config(queue={"url": f"sqlite:///{small_fs}/queue.db",
                                   "min_free_space": MIN_FREE},
                            metrics={"listen": f"127.0.0.1:{metrics_port}"})
    primary = deployment.sink(PRIMARY)
    relay = deployment.relay().start()
    first = deployment.send(SENDER, [ALICE], message(1))
    primary.wait_for_messages(1)

    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (free - MIN_FREE + 1024 * 1024))  # 1 MB short of the minimum
    text = healthz_until(metrics_port, 503)
    assert "short of space" in text and str(small_fs) in text
    code, reply = mail_from(deployment)
    assert (code, reply) == (452, "4.3.1 Insufficient system storage")
    relay.wait_for(r"452 4\.3\.1")  # the mail log names the refusal

    filler.unlink()
    assert healthz_until(metrics_port, 200).strip() == "ok"
    second = deployment.send(SENDER, [ALICE], message(2))
    got = primary.wait_for_messages(2)
    assert [(m.sender, m.recipients) for m in got] == [(SENDER, (ALICE,))] * 2
    relay.wait_for(rf"{second}: delivered ")
    assert relay.count(rf"{first}: delivered ") == 1
    assert relay.queue_list() == []  # nothing acknowledged was lost or left behind
    assert relay.terminate() == 0


LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()  # held until the test says so
db.execute("ROLLBACK")
"""


def test_a_locked_sqlite_queue_never_acknowledges_before_the_commit(
        deployment: Deployment, tmp_path: Path) -> None:
    primary = deployment.sink(PRIMARY)
    relay = deployment.relay().start()
    first = deployment.send(SENDER, [ALICE], message(1))
    primary.wait_for_messages(1)

    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(tmp_path / "queue.db")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None and locker.stdin is not None
    try:
        assert locker.stdout.readline().strip() == "locked"
        client = smtplib.SMTP(RELAY, deployment.relay_port, timeout=60)
        client.ehlo("client.sender.example")
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(ALICE)[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(message(2) + b".\r\n")
        client.sock.settimeout(2.0)  # while the lock is held: no reply at all
        with pytest.raises(TimeoutError):
            client.sock.recv(1)
        locker.stdin.write("\n")
        locker.stdin.flush()
        assert locker.wait(10) == 0
        client.sock.settimeout(60)
        code, reply = client.getreply()
        assert code == 250, reply  # said only once the commit is done
        second = reply.decode().rsplit(" ", 1)[1]
        client.quit()
    finally:
        locker.kill()
        locker.communicate()  # waits, and closes its pipes
    primary.wait_for_messages(2)
    relay.wait_for(rf"{second}: delivered ")
    assert relay.count(rf"{first}: delivered ") == 1
    assert relay.queue_list() == []
    assert relay.terminate() == 0


@needs_postgres
def test_postgresql_stopped_and_restarted_under_a_running_relay(
        deployment: Deployment) -> None:
    """A delivery in progress when the database goes away is recorded once it
    returns (not left `active` for its lease); meanwhile the accept side says
    451 4.3.0 and /healthz 503; all of it recovers by itself."""
    try:
        server = PostgresServer(ensure_binaries())
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        metrics_port = free_port("127.0.0.1")
        deployment.write_config(queue={"url": create_database(server.url)},
                                metrics={"listen": f"127.0.0.1:{metrics_port}"})
        primary = deployment.sink(PRIMARY)
        primary.hold_data()
        relay = deployment.relay()
        assert relay.cli("db", "upgrade").returncode == 0
        relay.start()
        first = deployment.send(SENDER, [ALICE], message(1))
        primary.wait_for_held(1)  # in delivery: the sink holds its reply

        server.halt()
        assert "database" in healthz_until(metrics_port, 503)
        with smtplib.SMTP(RELAY, deployment.relay_port, timeout=30) as client:
            client.ehlo("client.sender.example")
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt(ALICE)[0] == 250
            code, reply = client.data(message(2))
        assert (code, reply.decode()) == (451, "4.3.0 Error: queue file write error")
        primary.release_data()  # the delivery ends while the database is away
        relay.wait_for(rf"{first}: delivery attempt: not stored, will try again")

        server.resume()
        relay.wait_for(rf"{first}: delivery attempt: stored, the database answers again",
                       timeout=30)
        relay.wait_for(rf"{first}: delivered ")
        assert healthz_until(metrics_port, 200).strip() == "ok"
        second = deployment.send(SENDER, [ALICE], message(3))
        got = primary.wait_for_messages(2)
        relay.wait_for(rf"{second}: delivered ")
        assert [m.data.endswith(message(n)) for m, n in zip(got, (1, 3), strict=True)]
        assert relay.count(rf"{first}: delivered ") == 1  # recorded once, not sent again
        assert relay.queue_list() == []  # nothing acknowledged left behind, nothing active
        assert "Task exception was never retrieved" not in relay.log
        assert relay.terminate() == 0
    finally:
        primary.release_data()
        server.stop()


def test_a_queue_locked_past_lock_timeout_is_451_and_503_until_the_lock_goes(
        deployment: Deployment, tmp_path: Path) -> None:
    """Another process holds SQLite's write lock: the client hears 451 4.3.0
    within about twice `queue.lock_timeout` (never 250), `/healthz` says
    `database locked`, and both recover by themselves once the lock goes."""
    metrics_port = free_port("127.0.0.1")
    deployment.write_config(queue={"lock_timeout": "1s"},
                            metrics={"listen": f"127.0.0.1:{metrics_port}"})
    primary = deployment.sink(PRIMARY)
    relay = deployment.relay().start()
    first = deployment.send(SENDER, [ALICE], message(1))
    primary.wait_for_messages(1)
    assert healthz_until(metrics_port, 200).strip() == "ok"

    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(tmp_path / "queue.db")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None and locker.stdin is not None
    try:
        assert locker.stdout.readline().strip() == "locked"
        with smtplib.SMTP(RELAY, deployment.relay_port, timeout=30) as client:
            client.ehlo("client.sender.example")
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt(ALICE)[0] == 250
            began = time.monotonic()
            code, reply = client.data(message(2))
            waited = time.monotonic() - began
        assert (code, reply.decode()) == (451, "4.3.0 Error: queue file write error")
        assert waited < 5  # 1 s of lock_timeout, twice at most, not SQLite's 30 s
        assert healthz_until(metrics_port, 503).strip() == "database locked"
        locker.stdin.write("\n")
        locker.stdin.flush()
        assert locker.wait(10) == 0
    finally:
        locker.kill()
        locker.communicate()
    assert healthz_until(metrics_port, 200).strip() == "ok"
    third = deployment.send(SENDER, [ALICE], message(3))
    got = primary.wait_for_messages(2)
    relay.wait_for(rf"{third}: delivered ")
    assert [m.data.endswith(message(n)) for m, n in zip(got, (1, 3), strict=True)] == [True] * 2
    assert relay.count(rf"{first}: delivered ") == 1
    assert relay.queue_list() == []  # every acknowledged message delivered, nothing left
    assert "Traceback" not in relay.log
    assert relay.terminate() == 0
