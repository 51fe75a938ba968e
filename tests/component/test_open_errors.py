"""Errors that name their path or address and the cause: a queue database that
cannot be opened (real files and directories, permissions checked by a child
process that gives up root, as an operator's relay user would be), PostgreSQL
refusing us, `relay check-config` finding what `relay serve` would stop at, and
a listener whose port the test holds."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from relay.core import config as configuration
from relay.core.clock import FakeClock
from relay.core.oserror import ListenError, cause
from relay.queue import db
from relay.smtp.listeners import start_listeners
from tests.support.postgres import needs_postgres

NOBODY = 65534


def as_nobody(check: Callable[[], str | None]) -> str | None:
    """`check()` in a forked child that has given up root for `nobody`: the
    kernel, not our code, decides what it may do."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write, json.dumps(check()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(answer)  # type: ignore[no-any-return]


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory `nobody` can reach (pytest's tmp_path is root's alone)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    path = Path(tempfile.mkdtemp(prefix="relay-perm-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def url(path: Path) -> str:
    return f"sqlite:///{path}"


def test_a_file_in_the_way_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    for database in (tmp_path / "a-file" / "queue.db", tmp_path / "a-file" / "sub" / "queue.db"):
        with pytest.raises(db.DatabaseError) as caught:
            db.connect(url(database))
        assert str(caught.value) == (f"cannot open the queue database {database}: "
                                     f"a file is in the way: {tmp_path}/a-file is not a directory")


def test_a_directory_where_the_database_should_be(tmp_path: Path) -> None:
    (tmp_path / "queue.db").mkdir()
    assert db.open_problem(url(tmp_path / "queue.db")) == "a directory is in the way"


def test_a_relative_path_is_named_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spool").write_text("")
    with pytest.raises(db.DatabaseError, match=f"database {tmp_path}/spool/queue.db: "):
        db.connect("sqlite:///spool/queue.db")


def test_a_directory_we_may_not_write_in(world: Path) -> None:
    (world / "queue.db").write_text("")  # root's, 0644: not ours to write
    assert as_nobody(lambda: db.open_problem(url(world / "new.db"))) == (
        f"permission denied: cannot create files in {world}")
    assert as_nobody(lambda: db.open_problem(url(world / "queue.db"))) == "permission denied"
    assert as_nobody(lambda: db.open_problem(url(world / "spool" / "queue.db"))) == (
        f"no such directory {world}/spool, and {world} does not let us create it")
    (world / "spool").mkdir(mode=0o700)  # root's alone: cannot even look inside
    assert as_nobody(lambda: db.open_problem(url(world / "spool" / "queue.db"))) == (
        "permission denied")
    (world / "mine").mkdir()
    os.chown(world / "mine", NOBODY, NOBODY)
    assert as_nobody(lambda: db.open_problem(url(world / "mine" / "queue.db"))) is None
    assert as_nobody(lambda: db.open_problem(url(world / "mine" / "d" / "q.db"))) is None


def test_sqlite_refusing_a_file_names_it(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    engine = db.connect(url(garbage))
    try:
        with pytest.raises(db.DatabaseError) as caught:
            db.revision(engine)
    finally:
        engine.dispose()
    assert str(caught.value) == f"database unreachable: {garbage}: file is not a database"


def test_postgresql_unreachable_names_host_port_and_database_not_the_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = db.connect(f"postgresql+psycopg://relay:s3cret@127.0.0.1:{port}/relay")
    try:
        with pytest.raises(db.DatabaseError) as caught:
            db.revision(engine)
    finally:
        engine.dispose()
    message = str(caught.value)
    assert message.startswith(f"database unreachable: PostgreSQL at 127.0.0.1:{port}/relay: ")
    assert "Connection refused" in message and "s3cret" not in message


@needs_postgres
def test_postgresql_errors_carry_the_servers_message(postgres_db_url: str) -> None:
    missing = make_url(postgres_db_url).set(database="no_such_queue")
    engine = db.connect(missing.render_as_string(hide_password=False))
    try:
        with pytest.raises(db.DatabaseError) as caught:
            db.revision(engine)
    finally:
        engine.dispose()
    where = f"PostgreSQL at {missing.host}:{missing.port}/no_such_queue"
    assert str(caught.value).startswith(f"database unreachable: {where}: ")
    assert 'database "no_such_queue" does not exist' in str(caught.value)


def relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_check_config_reports_a_queue_path_serve_cannot_open(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "relay.toml"
    config.write_text(f'[queue]\nurl = "sqlite:///{tmp_path}/a-file/queue.db"\n'
                      '[domains."example.org"]\n')
    result = relay("check-config", "-c", str(config))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"{config}: queue.url: cannot create {tmp_path}/a-file/queue.db: "
                             f"{tmp_path}/a-file is not a directory\n")
    config.write_text(f'[queue]\nurl = "sqlite:///{tmp_path}/spool/queue.db"\n')
    assert relay("check-config", "-c", str(config)).returncode == 0  # serve would create it


def held_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("listener", ["SMTP", "metrics"])
def test_serve_names_the_listener_whose_port_is_taken(tmp_path: Path, listener: str) -> None:
    with held_port() as held:
        taken = f"127.0.0.1:{held.getsockname()[1]}"
        smtp = taken if listener == "SMTP" else f"127.0.0.1:{socket_free()}"
        metrics = taken if listener == "metrics" else ""
        config = tmp_path / "relay.toml"
        config.write_text(f'[smtp]\nlisten = ["{smtp}"]\n[metrics]\nlisten = "{metrics}"\n'
                          f'[queue]\nurl = "sqlite:///{tmp_path}/queue.db"\n'
                          '[domains."example.org"]\n')
        result = relay("-c", str(config), "serve")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"relay: cannot start: cannot listen for {listener} on {taken}: address already in use")


def socket_free() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_start_listeners_names_the_address_and_cause(tmp_path: Path) -> None:
    with held_port() as held:
        taken = f"127.0.0.1:{held.getsockname()[1]}"
        config = configuration.from_mapping({"smtp": {"listen": ["127.0.0.1:0", taken]}},
                                            env={}, base=tmp_path)

        async def submit(message: object) -> None:
            return None

        with pytest.raises(ListenError) as caught:
            await start_listeners(config, submit, id_factory=lambda: "ID", clock=FakeClock())
    assert str(caught.value) == f"cannot listen for SMTP on {taken}: address already in use"
    assert caught.value.errno == errno.EADDRINUSE


def test_causes_in_an_operators_words() -> None:
    assert cause(OSError(errno.EACCES, "Permission denied")) == "permission denied"
    assert cause(OSError(errno.EADDRINUSE, "x")) == "address already in use"
    assert cause(OSError(errno.EROFS, "x")) == "read-only file system"
    assert cause(OSError("no errno here")) == "no errno here"
