"""A real, private PostgreSQL server for the test session.

Owns: finding (or, as root on Debian, installing) the PostgreSQL server
binaries, running one throwaway cluster for the whole session, and handing
each test a fresh database of its own.

* `postgres_url` (session): ``postgresql+psycopg://postgres@127.0.0.1:PORT/postgres``
  of a superuser on a cluster made by `initdb` in a temp dir (on /dev/shm
  when it has room, else $TMPDIR; trust auth, TCP on 127.0.0.1 only, unix
  socket in that temp dir, fsync off), started
  with `pg_ctl`, stopped and removed at session end. When
  ``RELAY_TEST_POSTGRES_URL`` is set, that server is used instead and
  nothing is installed or started.
* `postgres_databases` (function): a factory of fresh databases on it;
  each is dropped (``WITH (FORCE)``) after the test.
* `postgres_db_url` (function): one such database.

The binaries are taken from ``/usr/lib/postgresql/*/bin`` (newest version).
When they are missing and we are root, Debian's ``postgresql`` package is
installed non-interactively; the cluster its postinst creates (and may
start on port 5432) is stopped and set to ``manual`` start. The install
runs from `pytest_runtestloop`, once, before the first test, when a
selected test carries the ``postgresql`` mark (given automatically to
tests that request these fixtures; a parameter that reaches them through
`request.getfixturevalue` carries it explicitly), so pytest-timeout's
per-test timer does not cover it; it has its own timeout instead.

When no server can be had (not root, no network) the tests that need one
are skipped with the reason, except under ``CI``, where they error: CI
must really run them.

Refuses: anything but a disposable server of its own, the system's
packaged cluster included.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from relay.queue import db

ENV_URL = "RELAY_TEST_POSTGRES_URL"
MARK = "postgresql"
FIXTURES = frozenset({"postgres_url", "postgres_databases", "postgres_db_url"})
PG_ROOT = Path("/usr/lib/postgresql")
TOOLS = ("initdb", "pg_ctl", "pg_isready", "postgres")
INSTALL_TIMEOUT = 600.0  # seconds, each of apt-get update / apt-get install
START_TIMEOUT = 30  # seconds, pg_ctl start -w and then pg_isready
SUPERUSER = "postgres"

needs_postgres = pytest.mark.postgresql  # for pytest.param("postgresql", marks=...)


class Unavailable(Exception):
    """No PostgreSQL server can be had here; the message says why."""


# -- binaries --------------------------------------------------------------------


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def find_bindir(root: Path = PG_ROOT) -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding every tool we run."""
    found = [b for b in root.glob("*/bin") if all((b / tool).is_file() for tool in TOOLS)]
    return max(found, key=_version_key) if found else None


def _run(cmd: Sequence[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False, **kwargs,
    )


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _clusters() -> dict[tuple[str, str], str]:
    """Packaged (Debian postgresql-common) clusters: (version, name) -> status."""
    if shutil.which("pg_lsclusters") is None:
        return {}
    try:
        out = _run(["pg_lsclusters", "--no-header"], timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    clusters = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0][0].isdigit():
            clusters[(fields[0], fields[1])] = fields[3]
    return clusters


def _apt_install() -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "l"}
    return _run(
        ["apt-get", "-o", "DPkg::Lock::Timeout=300",
         "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
         "install", "-y", "-q", "--no-install-recommends", "postgresql"],
        timeout=INSTALL_TIMEOUT, env=env,
    )


def _apt_update() -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "-q", "update"],
                timeout=INSTALL_TIMEOUT, env=env)


def _quiet_packaged_clusters(before: dict[tuple[str, str], str]) -> None:
    """Stop the clusters the package install created, and keep them from autostarting."""
    for (version, name), _status in _clusters().items():
        if (version, name) in before:
            continue  # not ours: leave the machine's own clusters alone
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run(["pg_ctlcluster", version, name, "stop"], timeout=60)
        start_conf = Path("/etc/postgresql") / version / name / "start.conf"
        if start_conf.is_file():
            with contextlib.suppress(OSError):
                start_conf.write_text(
                    "# set by mx-relay's tests/support/postgres.py: installed for tests only\n"
                    "manual\n")


@dataclass
class _Install:
    bindir: Path | None = None
    problem: str = ""
    seconds: float = 0.0
    done: bool = False


_INSTALL = _Install()


def ensure_binaries() -> Path:
    """The server binaries' directory, installing Debian's package if need be (once)."""
    if not _INSTALL.done:
        started = time.monotonic()
        try:
            _INSTALL.bindir = _find_or_install()
        except Unavailable as exc:
            _INSTALL.problem = str(exc)
        _INSTALL.seconds = time.monotonic() - started
        _INSTALL.done = True
    if _INSTALL.bindir is None:
        raise Unavailable(_INSTALL.problem)
    return _INSTALL.bindir


def _find_or_install() -> Path:
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    where = f"no PostgreSQL server binaries ({', '.join(TOOLS)}) under {PG_ROOT}/*/bin"
    if os.geteuid() != 0:
        raise Unavailable(f"{where}, and not root to apt-get install postgresql; "
                          f"install it or set {ENV_URL}")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{where}, and no apt-get to install postgresql; set {ENV_URL}")
    before = _clusters()
    update_said = ""
    try:
        result = _apt_install()
        if result.returncode != 0:  # a stale or missing package list: update, once
            update = _apt_update()
            if update.returncode != 0:
                raise Unavailable(f"{where}; apt-get update failed: {_tail(update.stdout)}")
            update_said = "; ".join(  # apt-get update may exit 0 although fetches failed
                line.strip() for line in update.stdout.splitlines() if line.startswith(("W:", "E:"))
            )
            result = _apt_install()
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"{where}; {exc.cmd[0]} took over {exc.timeout:.0f}s") from None
    except OSError as exc:
        raise Unavailable(f"{where}; cannot run apt-get: {exc}") from None
    finally:
        _quiet_packaged_clusters(before)
    if result.returncode != 0:
        raise Unavailable(f"{where}; apt-get install postgresql failed: {_tail(result.stdout, 3)}"
                          + (f" (apt-get update: {update_said[:300]})" if update_said else ""))
    bindir = find_bindir()
    if bindir is None:
        raise Unavailable(f"{where}, even after apt-get install postgresql")
    return bindir


# -- the server ---------------------------------------------------------------------

SHM = Path("/dev/shm")
SHM_MIN_FREE = 1 << 30  # bytes: a cluster takes ~40 MB, each live test database ~8 MB
STALE_AFTER = 3600.0  # seconds: a leftover dir this old with no live server is removed


def _workdir_parent() -> Path | None:
    """tmpfs when there is room (CREATE DATABASE is ~10x faster there), else $TMPDIR."""
    try:
        vfs = os.statvfs(SHM)
    except OSError:
        return None
    if not os.access(SHM, os.W_OK) or vfs.f_bavail * vfs.f_frsize < SHM_MIN_FREE:
        return None
    return SHM


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def _remove_stale_workdirs(parent: Path) -> None:
    """Remove what killed sessions left behind: old dirs whose server is not running."""
    for old in parent.glob("relay-pg-*"):
        try:
            if time.time() - old.stat().st_mtime < STALE_AFTER:
                continue
            pid_file = old / "data" / "postmaster.pid"
            if pid_file.exists() and _alive(int(pid_file.read_text().split()[0])):
                continue
        except (OSError, ValueError, IndexError):
            continue
        shutil.rmtree(old, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class PostgresServer:
    """One throwaway cluster: `initdb` into a temp dir, `pg_ctl start`, `stop()` removes it.

    As root the tools run as the `postgres` OS user (initdb and pg_ctl refuse
    root); otherwise as ourselves. Tests run it without fsync; `durable=True`
    keeps fsync and synchronous_commit at their defaults, for benchmarks whose
    figures must be honest (bench/pgserver.py).
    """

    def __init__(self, bindir: Path, *, durable: bool = False,
                 settings: Sequence[str] = ()) -> None:
        self.bindir = bindir
        self.durable = durable
        self.settings = tuple(settings)  # more `-c name=value` for the server
        self.port = 0
        parent = None if durable else _workdir_parent()  # durable: on disk, where fsync costs
        _remove_stale_workdirs(parent or Path(tempfile.gettempdir()))
        self.base = Path(tempfile.mkdtemp(prefix="relay-pg-", dir=parent))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self._owner: tuple[int, int] | None = None
        self._running = False
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.base, ignore_errors=True)
                raise Unavailable("running as root and there is no 'postgres' OS user "
                                  "to run initdb as") from None
            self._owner = (entry.pw_uid, entry.pw_gid)
            os.chown(self.base, *self._owner)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def _tool(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        extra: dict[str, Any] = {}
        if self._owner is not None:
            extra = {"user": self._owner[0], "group": self._owner[1], "extra_groups": []}
        return _run([str(self.bindir / args[0]), *args[1:]], timeout=timeout,
                    cwd=self.base, env=env, **extra)

    def _log_tail(self) -> str:
        try:
            return _tail(self.log.read_text(errors="replace"))
        except OSError:
            return ""

    def start(self) -> None:
        init = self._tool("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                          "--no-locale", "--encoding=UTF8",
                          *(() if self.durable else ("--no-sync",)), timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {_tail(init.stdout)}")
        for _ in range(5):  # another process may take the free port first
            self.port = free_port()
            started = self._pg_ctl_start()
            if started.returncode == 0:
                self._running = True
                break
            if "could not bind" not in self._log_tail() and "in use" not in self._log_tail():
                raise RuntimeError(f"pg_ctl start failed: {_tail(started.stdout)} "
                                   f"log: {self._log_tail()}")
        else:
            raise RuntimeError(f"pg_ctl start: no free port; log: {self._log_tail()}")
        self._wait_ready()

    def _pg_ctl_start(self) -> subprocess.CompletedProcess[str]:
        options = " ".join((
            "-c listen_addresses=127.0.0.1", f"-c port={self.port}",
            f"-c unix_socket_directories={self.base}",
            *(() if self.durable else ("-c fsync=off", "-c synchronous_commit=off",
                                       "-c full_page_writes=off")),
            "-c max_parallel_workers_per_gather=0",
            *(f"-c {setting}" for setting in self.settings),
        ))
        return self._tool("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
                          "-w", "-t", str(START_TIMEOUT), "-s", "-o", options,
                          timeout=START_TIMEOUT + 15)

    def halt(self) -> None:
        """Stop the server as an outage would, keeping its files and port for `resume()`."""
        stopped = self._tool("pg_ctl", "stop", "-D", str(self.data), "-m", "fast",
                             "-w", "-t", "20", "-s", timeout=30)
        if stopped.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {_tail(stopped.stdout)}")
        self._running = False

    def resume(self) -> None:
        """Start a halted server again, on the same port with the same data."""
        started = self._pg_ctl_start()
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {_tail(started.stdout)} "
                               f"log: {self._log_tail()}")
        self._running = True
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            ready = self._tool("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", SUPERUSER, "-d", "postgres", "-t", "2", timeout=10)
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} not ready after "
                                   f"{START_TIMEOUT}s; log: {self._log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server and remove its files; idempotent."""
        if self._running:
            self._running = False
            try:
                stopped = self._tool("pg_ctl", "stop", "-D", str(self.data), "-m", "fast",
                                     "-w", "-t", "20", "-s", timeout=30)
                if stopped.returncode != 0:
                    self._tool("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate",
                               "-w", "-t", "20", "-s", timeout=30)
            except (OSError, subprocess.SubprocessError):
                pass
        shutil.rmtree(self.base, ignore_errors=True)


# -- databases ------------------------------------------------------------------------


def create_database(admin_url: str) -> str:
    """A new, empty database on the server of `admin_url`; its URL (password kept)."""
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(make_url(admin_url), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    """Drop the database of `url`, disconnecting whoever still uses it."""
    name = make_url(url).database
    admin = create_engine(make_url(admin_url), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


# -- fixtures ---------------------------------------------------------------------------


def _unavailable(reason: str) -> NoReturn:
    reason = f"no PostgreSQL server for the tests: {reason}"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI must run the PostgreSQL tests)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A superuser URL of a PostgreSQL server private to this test session."""
    given = os.environ.get(ENV_URL, "")
    if given:
        yield db.normalise_url(given).render_as_string(hide_password=False)
        return
    try:
        server = PostgresServer(ensure_binaries())
    except Unavailable as exc:
        _unavailable(str(exc))
    atexit.register(server.stop)  # should the session end without teardown
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_databases(postgres_url: str) -> Iterator[Callable[[], str]]:
    """Make fresh databases (a URL each) on the session's server; all dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        url = create_database(postgres_url)
        made.append(url)
        return url

    yield make
    for url in made:
        drop_database(postgres_url, url)


@pytest.fixture
def postgres_db_url(postgres_databases: Callable[[], str]) -> str:
    """A fresh, empty database of its own for this test, dropped afterwards."""
    return postgres_databases()


# -- hooks ------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARK}: needs the session's PostgreSQL server (tests/support/postgres.py)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(MARK)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Install the server, when a selected test needs it, before any test's timeout runs."""
    if session.config.option.collectonly or os.environ.get(ENV_URL):
        return
    if not any(item.get_closest_marker(MARK) for item in session.items):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if find_bindir() is None and reporter is not None:
        reporter.write_line("tests/support/postgres.py: installing Debian's postgresql "
                            "package for the PostgreSQL tests ...")
    with contextlib.suppress(Unavailable):  # the fixture skips with the reason
        ensure_binaries()
    if reporter is not None and _INSTALL.seconds >= 1:
        outcome = _INSTALL.problem or f"PostgreSQL ready in {_INSTALL.bindir}"
        reporter.write_line(f"tests/support/postgres.py: {outcome} ({_INSTALL.seconds:.0f}s)")
