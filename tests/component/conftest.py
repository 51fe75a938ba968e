"""Fixtures component tests share.

`queue`: a migrated, empty queue on SQLite and on PostgreSQL. `mail_log`: the
lines of the mail log (`relay.mail`) while a relay runs in the test's loop.
"""

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay.queue import db
from relay.queue.access import Queue
from tests.support.log_lines import LogLines, capturing
from tests.support.postgres import needs_postgres

MAIL_LOG_DEADLINE = 15.0  # seconds a test waits for an expected mail log line

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


@pytest.fixture
async def mail_log() -> AsyncIterator[LogLines]:
    async with capturing(LogLines(deadline=MAIL_LOG_DEADLINE), "relay.mail",
                         logging.INFO) as handler:
        yield handler
