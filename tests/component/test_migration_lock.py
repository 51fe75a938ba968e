"""Migrations serialised across processes: many `relay db upgrade` at once.

Real processes on a fresh database of the test's own (SQLite file, or the
session's private PostgreSQL): all started together on an empty database
and on one left at an older revision, every one must succeed and the schema
end at head. Without the lock PostgreSQL's second CREATE TABLE failed with
`duplicate key value violates unique constraint "pg_type_typname_nsp_index"`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import relay.migrations
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import inspect

from relay.queue import db
from tests.support.postgres import needs_postgres

PROCESSES = 5
BACKENDS = ["sqlite", pytest.param("postgresql", marks=needs_postgres)]


def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.node.callspec.params["backend"] == "postgresql":
        url: str = request.getfixturevalue("postgres_db_url")
        return url
    return f"sqlite:///{tmp_path}/queue.db"


def upgrade_at_once(url: str, tmp_path: Path) -> list[subprocess.CompletedProcess[str]]:
    """Start PROCESSES `relay db upgrade` without waiting for any, then collect them."""
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    env["RELAY_QUEUE_URL"] = url
    procs = [
        subprocess.Popen([sys.executable, "-m", "relay", "db", "upgrade"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(PROCESSES)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def assert_all_at_head(url: str, results: list[subprocess.CompletedProcess[str]]) -> None:
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "(head)" in result.stdout
    engine = db.connect(url)
    try:
        assert db.revision(engine).up_to_date
        assert {"messages", "recipients", "destinations", "queue_counts"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_processes_migrate_an_empty_database_at_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = fresh_url(request, tmp_path)
    assert_all_at_head(url, upgrade_at_once(url, tmp_path))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_processes_migrate_an_old_database_at_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = fresh_url(request, tmp_path)
    engine = db.connect(url)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(relay.migrations.__file__).parent))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    assert db.revision(engine).current == "0003"
    engine.dispose()
    assert_all_at_head(url, upgrade_at_once(url, tmp_path))
