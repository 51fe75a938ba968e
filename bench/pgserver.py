"""A private PostgreSQL server for the benchmarks: initdb, start, databases, stop.

Owns: finding the server binaries (/usr/local/bin or the newest
/usr/lib/postgresql/*/bin), one throwaway cluster in a temp dir on disk
(trust auth, TCP on 127.0.0.1 only, a free port, the unix socket in that
dir, fsync and synchronous_commit at their defaults, so that figures are
honest), started with `pg_ctl`, stopped and removed by `stop()`; fresh
databases on it for each relay.

As root the tools run as the `postgres` OS user (initdb and pg_ctl refuse
root), as tests/support/postgres.py does; benchmarks do not import tests/.

Refuses: installing PostgreSQL (a missing server is a SystemExit saying so),
and any cluster but its own.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import free_port

TOOLS = ("initdb", "pg_ctl", "pg_isready", "postgres")
SUPERUSER = "postgres"
START_TIMEOUT = 30  # seconds


def find_bindir() -> Path | None:
    """/usr/local/bin when it holds every tool, else the newest /usr/lib/postgresql/*/bin."""
    local = Path("/usr/local/bin")
    if all((local / tool).is_file() for tool in TOOLS):
        return local
    found = [b for b in Path("/usr/lib/postgresql").glob("*/bin")
             if all((b / tool).is_file() for tool in TOOLS)]

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", bindir.parent.name)) or (0,)

    return max(found, key=version) if found else None


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


class PgServer:
    """One cluster of our own; `url` is a superuser URL; `stop()` removes everything."""

    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL server binaries (initdb, pg_ctl, postgres) under "
                             "/usr/local/bin or /usr/lib/postgresql/*/bin: "
                             "apt-get install postgresql")
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="relay-bench-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = 0
        self.version = ""  # "16.4", known once started
        self.running = False
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.base, ignore_errors=True)
                raise SystemExit("running as root and there is no 'postgres' OS user "
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
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, check=False, cwd=self.base, env=env, **extra)

    def log_tail(self) -> str:
        try:
            return _tail(self.log.read_text(errors="replace"))
        except OSError:
            return ""

    def start(self) -> None:
        init = self._tool("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                          "--no-locale", "--encoding=UTF8", timeout=120)
        if init.returncode != 0:
            raise SystemExit(f"initdb failed: {_tail(init.stdout)}")
        self.version = self._tool("postgres", "--version").stdout.split()[2]
        for _ in range(5):  # another process may take the free port first
            self.port = free_port("127.0.0.1")
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                       f"-c unix_socket_directories={self.base} -c max_connections=200")
            started = self._tool("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
                                 "-w", "-t", str(START_TIMEOUT), "-s", "-o", options,
                                 timeout=START_TIMEOUT + 15)
            if started.returncode == 0:
                self.running = True
                break
            if "could not bind" not in self.log_tail() and "in use" not in self.log_tail():
                raise SystemExit(f"pg_ctl start failed: {_tail(started.stdout)} "
                                 f"log: {self.log_tail()}")
        else:
            raise SystemExit(f"pg_ctl start: no free port; log: {self.log_tail()}")
        deadline = time.monotonic() + START_TIMEOUT
        while self._tool("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port),
                         "-U", SUPERUSER, "-t", "2", timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"PostgreSQL not ready; log: {self.log_tail()}")
            time.sleep(0.1)  # polling a server we just started

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid: pg_ctl starts it in a session of its own, led by it."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _admin(self, sql: str) -> None:
        from sqlalchemy import create_engine  # the venv's packages
        from sqlalchemy.pool import NullPool

        engine = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(sql)
        finally:
            engine.dispose()

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"relay_bench_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def drop_database(self, url: str) -> None:
        """Drop the database of `url`, disconnecting whoever still uses it."""
        self._admin(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server and remove its files; idempotent."""
        if self.running:
            self.running = False
            for mode in ("fast", "immediate"):
                try:
                    if self._tool("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w",
                                  "-t", "20", "-s", timeout=30).returncode == 0:
                        break
                except (OSError, subprocess.SubprocessError):
                    continue
        shutil.rmtree(self.base, ignore_errors=True)
