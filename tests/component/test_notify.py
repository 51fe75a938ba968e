"""Wake-ups between processes sharing a queue (relay/cluster/notify.py), for real:
a unix datagram socket beside a SQLite file, LISTEN/NOTIFY on a private PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from relay.cluster import notify
from relay.queue import db
from tests.support.postgres import needs_postgres

DEADLINE = 10.0  # seconds a wake-up may take before the test fails (it takes milliseconds)


class Wakes:
    """Counts wake-ups on the event loop; a test awaits the next one."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self) -> None:
        await asyncio.wait_for(self.event.wait(), DEADLINE)
        self.event.clear()


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[Engine]:
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    await asyncio.to_thread(db.upgrade, engine)
    yield engine
    engine.dispose()


async def listening(engine: Engine) -> tuple[notify.Listener, Wakes]:
    wakes = Wakes()
    ear = notify.listener(engine, wakes)
    ear.start(asyncio.get_running_loop())
    return ear, wakes


async def test_a_notify_on_sqlite_wakes_the_listener(sqlite_engine: Engine) -> None:
    ear, wakes = await listening(sqlite_engine)
    try:
        await asyncio.to_thread(notify.notify, sqlite_engine)
        await wakes.next()
        assert wakes.count == 1
    finally:
        ear.close()


async def test_the_sqlite_socket_has_the_database_file_mode_and_goes_with_the_listener(
    sqlite_engine: Engine,
) -> None:
    database = Path(str(sqlite_engine.url.database))
    os.chmod(database, 0o640)
    address = notify.sqlite_address(str(database))
    assert address == f"{database.resolve()}.wake"
    ear, _ = await listening(sqlite_engine)
    assert stat.S_ISSOCK(os.stat(address).st_mode)
    assert stat.S_IMODE(os.stat(address).st_mode) == 0o640
    ear.close()
    assert not os.path.exists(address)


async def test_a_socket_left_by_a_killed_relay_is_replaced(sqlite_engine: Engine) -> None:
    first, _ = await listening(sqlite_engine)
    assert isinstance(first, notify.SocketListener)
    first._inode = None  # as if killed: its socket file stays behind
    first.close()
    address = notify.sqlite_address(sqlite_engine.url.database)
    assert address is not None and os.path.exists(address)
    second, wakes = await listening(sqlite_engine)
    try:
        notify.notify(sqlite_engine)
        await wakes.next()
    finally:
        second.close()


def test_notify_without_a_running_relay_is_silent(sqlite_engine: Engine, tmp_path: Path) -> None:
    notify.notify(sqlite_engine)  # no socket at all
    address = notify.sqlite_address(sqlite_engine.url.database)
    assert address is not None
    Path(address).write_text("not a socket")
    notify.notify(sqlite_engine)  # something else in its place


async def test_a_path_too_long_for_a_socket_uses_the_abstract_namespace(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    engine = db.connect(f"sqlite:///{deep}/queue.db")
    try:
        await asyncio.to_thread(db.upgrade, engine)
        address = notify.sqlite_address(engine.url.database)
        assert address is not None and address.startswith("\0")
        ear, wakes = await listening(engine)
        try:
            notify.notify(engine)
            await wakes.next()
        finally:
            ear.close()
    finally:
        engine.dispose()


def test_an_in_memory_queue_has_no_wake_up_channel() -> None:
    assert notify.sqlite_address(":memory:") is None
    assert notify.sqlite_address(None) is None


@needs_postgres
async def test_notify_on_postgresql_wakes_the_listener_and_survives_a_lost_connection(
    postgres_db_url: str,
) -> None:
    engine = db.connect(postgres_db_url)
    ear, wakes = await listening(engine)
    assert isinstance(ear, notify.PostgresListener)
    try:
        assert await asyncio.to_thread(ear.listening.wait, DEADLINE)
        await asyncio.to_thread(notify.notify, engine)
        await wakes.next()

        def kill_listener() -> None:
            with engine.begin() as conn:
                killed = conn.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()").all()
            assert killed == [(True,)]

        await asyncio.to_thread(kill_listener)
        await wakes.next()  # reconnected: it wakes once, a NOTIFY may have been missed
        assert await asyncio.to_thread(ear.listening.wait, DEADLINE)
        await asyncio.to_thread(notify.notify, engine)
        await wakes.next()
    finally:
        ear.close()
        engine.dispose()


def test_notify_on_an_unreachable_postgresql_is_silent() -> None:
    from tests.support.smtp_sink import closed_port

    engine = db.connect(f"postgresql+psycopg://relay@127.0.0.1:{closed_port()}/relay")
    try:
        notify.notify(engine)
    finally:
        engine.dispose()

