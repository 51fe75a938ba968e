"""A private PostgreSQL server for the benchmarks: the tests' throwaway
cluster (tests/support/postgres.py), kept durable.

Owns what a benchmark needs beyond the tests' server: fsync and
synchronous_commit at their defaults (so that every `250` waits for a WAL
flush and figures are honest), room for 200 connections, the server's
version for the report, the postmaster's pid for CPU accounting, and a
SystemExit naming the problem instead of a test skip.

Refuses: installing PostgreSQL (a missing server is a SystemExit saying so),
and any cluster but its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import postgres


def find_bindir() -> Path | None:
    """/usr/local/bin when it holds every tool, else the tests' choice (the newest
    /usr/lib/postgresql/*/bin)."""
    local = Path("/usr/local/bin")
    if all((local / tool).is_file() for tool in postgres.TOOLS):
        return local
    return postgres.find_bindir()


class PgServer(postgres.PostgresServer):
    """One durable cluster of our own; `url` is a superuser URL; `stop()` removes everything."""

    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL server binaries (initdb, pg_ctl, postgres) under "
                             "/usr/local/bin or /usr/lib/postgresql/*/bin: "
                             "apt-get install postgresql")
        try:
            super().__init__(bindir, durable=True, settings=("max_connections=200",))
        except postgres.Unavailable as exc:
            raise SystemExit(str(exc)) from None
        self.version = ""  # "15.18", known once started

    def start(self) -> None:
        try:
            super().start()
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        self.version = self._tool("postgres", "--version").stdout.split()[2]

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid: pg_ctl starts it in a session of its own, led by it."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        return postgres.create_database(self.url)

    def drop_database(self, url: str) -> None:
        """Drop the database of `url`, disconnecting whoever still uses it."""
        postgres.drop_database(self.url, url)
