"""The `queue` fixture: a migrated, empty queue on SQLite and on PostgreSQL."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.queue import db
from relay.queue.access import Queue
from tests.support.postgres import needs_postgres

BACKENDS = ["sqlite", pytest.param("postgresql", marks=needs_postgres)]


@pytest.fixture(params=BACKENDS)
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queue]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/queue.db"
    else:  # a fresh database on the session's server, dropped afterwards
        url = request.getfixturevalue("postgres_db_url")
    engine = db.connect(url)
    db.upgrade(engine)
    try:
        yield Queue(engine)
    finally:
        engine.dispose()
