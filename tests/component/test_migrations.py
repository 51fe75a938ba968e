"""Alembic revisions against real databases: backfill, round trips, schema parity.

SQLite and PostgreSQL (the session's private server from
tests/support/postgres.py, or RELAY_TEST_POSTGRES_URL's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import relay.migrations
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, insert, inspect, select, text

from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import NewMessage, Selector
from relay.queue.schema import bodies, destinations, messages, metadata
from tests.support.postgres import needs_postgres

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STATES = ("active", "deferred", "hold")

BACKENDS = ["sqlite", pytest.param("postgresql", marks=needs_postgres)]


@pytest.fixture(params=BACKENDS)
def make_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Engine]]:
    """Fresh empty databases of the backend under test, as many as asked for."""
    engines: list[Engine] = []
    new_pg_database: Callable[[], str] | None = (
        request.getfixturevalue("postgres_databases")  # each dropped after the test
        if request.param == "postgresql"
        else None
    )

    def make() -> Engine:
        if new_pg_database is None:
            url = f"sqlite:///{tmp_path}/{len(engines)}.db"
        else:
            url = new_pg_database()
        engine = db.connect(url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def migrate(engine: Engine, verb: str, target: str) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(relay.migrations.__file__).parent))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, verb)(cfg, target)


def put_raw(engine: Engine, rows: list[tuple[str, str, str]]) -> None:
    """(id, destination, state) rows written straight into the tables, bypassing Queue."""
    with engine.begin() as conn:
        conn.execute(insert(bodies), [{"id": qid, "data": b"x"} for qid, _, _ in rows])
        conn.execute(insert(messages), [
            {"id": qid, "body_id": qid, "destination": dest, "sender": "s@x.example", "size": 1,
             "received_at": T0 + timedelta(seconds=i), "client_address": "",
             "client_helo": "", "smtputf8": False, "eightbit": False, "is_dsn": False,
             "state": state, "next_attempt_at": T0, "attempts": 0, "last_error": "",
             "delay_warned": False}
            for i, (qid, dest, state) in enumerate(rows)
        ])


def truth(engine: Engine) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        return {
            (d, s): n
            for d, s, n in conn.execute(
                select(messages.c.destination, messages.c.state, func.count())
                .group_by(messages.c.destination, messages.c.state)
            )
        }


def counted(engine: Engine) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        return {
            (d, s): int(n)
            for d, s, n in conn.execute(text(
                "SELECT destination, state, sum(n) FROM queue_counts "
                "GROUP BY destination, state HAVING sum(n) <> 0"))
        }


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def triggers(engine: Engine) -> dict[str, str]:
    """Trigger (and trigger function) definitions as the database reports them."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return dict(conn.execute(text(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")).all())
        found = dict(conn.execute(text(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal"
        )).all())
        found.update(conn.execute(text(
            "SELECT proname, pg_get_functiondef(p.oid) FROM pg_proc p "
            "JOIN pg_namespace ns ON ns.oid = p.pronamespace WHERE nspname = 'public'"
        )).all())
        return found


MIXED = [
    ("01", "verrotech.com", "deferred"),
    ("02", "verrotech.com", "deferred"),
    ("03", "verrotech.com", "hold"),
    ("04", "other.example", "active"),
    ("05", "other.example", "deferred"),
    ("06", "third.example", "hold"),
]


def test_upgrade_backfills_counts_from_existing_rows(make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    migrate(engine, "upgrade", "0001")
    put_raw(engine, MIXED)
    migrate(engine, "upgrade", "head")
    assert counted(engine) == truth(engine) == {
        ("verrotech.com", "deferred"): 2, ("verrotech.com", "hold"): 1,
        ("other.example", "active"): 1, ("other.example", "deferred"): 1,
        ("third.example", "hold"): 1}
    queue = Queue(engine)
    assert queue.counts() == {"active": 1, "deferred": 3, "hold": 2}
    # and the triggers carry on from the backfill
    queue.put_many([NewMessage(id="07", sender="", recipients=("a@verrotech.com",),
                               data=b"x", received_at=T0)])
    queue.release(Selector(everything=True), T0)
    queue.delete(Selector(domain="other.example"))
    assert counted(engine) == truth(engine)
    assert queue.counts() == {"active": 0, "deferred": 5, "hold": 0}


def test_downgrade_and_upgrade_again(make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    db.upgrade(engine)
    put_raw(engine, MIXED[:3])
    migrate(engine, "downgrade", "0001")
    assert "queue_counts" not in tables(engine)
    assert triggers(engine) == {}
    put_raw(engine, MIXED[3:])  # written while no trigger counts them
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET state = 'deferred' WHERE id = '03'"))
    migrate(engine, "upgrade", "head")
    assert counted(engine) == truth(engine)
    assert Queue(engine).counts() == {"active": 1, "deferred": 4, "hold": 1}


def test_full_round_trip_to_base(make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    db.upgrade(engine)
    migrate(engine, "downgrade", "base")
    assert tables(engine) == set()
    assert triggers(engine) == {}
    db.upgrade(engine)
    assert tables(engine) == set(metadata.tables)
    assert db.revision(engine).up_to_date


def test_migrations_give_the_schema_of_the_metadata(make_engine: Callable[[], Engine]) -> None:
    migrated = make_engine()
    db.upgrade(migrated)
    with migrated.connect() as conn:
        diffs = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diffs == []

    fresh = make_engine()  # metadata.create_all also creates the triggers (schema.py DDL)
    with fresh.begin() as conn:
        metadata.create_all(conn)
    assert triggers(migrated) == triggers(fresh)
    assert len(triggers(fresh)) == 3


def test_create_all_schema_counts_too(make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    with engine.begin() as conn:
        metadata.create_all(conn)
    put_raw(engine, MIXED)
    assert counted(engine) == truth(engine)
    with engine.begin() as conn:
        metadata.drop_all(conn)
    assert tables(engine) == set()
    assert triggers(engine) == {}


def put_destination(engine: Engine, name: str, up: bool) -> None:
    with engine.begin() as conn:
        conn.execute(insert(destinations), [{"name": name, "up": up, "failures": 0 if up else 3,
                                             "retry_at": None, "last_error": "",
                                             "updated_at": T0}])


def test_upgrade_rewrites_u_label_destinations_as_a_labels(
        make_engine: Callable[[], Engine]) -> None:
    engine = make_engine()
    migrate(engine, "upgrade", "0003")
    put_raw(engine, [("01", "bücher.test", "deferred"), ("02", "bücher.test", "hold"),
                     ("03", "xn--bcher-kva.test", "deferred"), ("04", "BÜCHER.test", "active"),
                     ("05", "verrotech.com", "deferred"), ("06", "[192.0.2.1]", "deferred")])
    put_destination(engine, "bücher.test", up=False)
    put_destination(engine, "xn--bcher-kva.test", up=True)  # its twin: the old one goes
    put_destination(engine, "straße.test", up=False)
    assert counted(engine)[("bücher.test", "deferred")] == 1
    migrate(engine, "upgrade", "head")

    assert counted(engine) == truth(engine) == {
        ("xn--bcher-kva.test", "deferred"): 2, ("xn--bcher-kva.test", "hold"): 1,
        ("xn--bcher-kva.test", "active"): 1, ("verrotech.com", "deferred"): 1,
        ("[192.0.2.1]", "deferred"): 1}
    with engine.connect() as conn:
        assert dict(conn.execute(select(destinations.c.name, destinations.c.up)).all()) == {
            "xn--bcher-kva.test": True, "xn--strae-oqa.test": False}
        leftovers = conn.execute(text(
            "SELECT count(*) FROM queue_counts WHERE destination LIKE '%ü%'")).scalar_one()
    assert leftovers == 0
    queue = Queue(engine)
    assert [m.id for m in queue.list(domain="bücher.test")] == ["01", "02", "03", "04"]
    assert [m.id for m in queue.list(domain="xn--bcher-kva.test")] == ["01", "02", "03", "04"]
    # the triggers carry on under the new name
    queue.delete(Selector(domain="BÜCHER.test"))
    assert counted(engine) == truth(engine)
    assert set(truth(engine)) == {("verrotech.com", "deferred"), ("[192.0.2.1]", "deferred")}
