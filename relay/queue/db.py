"""Database connections and schema migrations.

Owns how we connect (URL normalisation, SQLite durability pragmas, write
transactions that take the lock up front), the Alembic revision checks that
`relay serve` and `relay db` perform, and the wording of a database that
cannot be opened: every such error names the resolved location (SQLite's
absolute path; PostgreSQL's host, port and database, never a password) and
the cause. Refuses to know any table's contents: that is the queue's parts
(`writes.py`, `commands.py`, `views.py`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

import relay.migrations
from relay.core.oserror import cause

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# Alembic is imported where it is used: `relay queue ...` starts without it.


WAL_SIZE_LIMIT = 64 * 1024 * 1024
LOCK_TIMEOUT = 30.0  # seconds a SQLite write waits for a lock (`relay serve`: queue.lock_timeout)
# pg_advisory_xact_lock key held while migrating ("relaymig"): one node migrates,
# the others wait and then find the schema at head.
MIGRATION_LOCK = 0x72656C61796D6967


class DatabaseError(Exception):
    """A database problem worth one clear line to an operator."""


def normalise_url(url: str) -> URL:
    """Pick the synchronous driver we ship for each backend.

    The queue runs its SQL in worker threads, so the async driver names an
    operator may write (`+asyncpg`, `+aiosqlite`) map to their sync peers.
    """
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite":
        return parsed.set(drivername="sqlite")
    if backend in ("postgresql", "postgres"):
        if driver in ("", "asyncpg", "psycopg_async", "psycopg"):
            return parsed.set(drivername="postgresql+psycopg")
        return parsed
    raise DatabaseError(f"unsupported database URL scheme {parsed.drivername!r}")


def location(url: str | URL) -> str:
    """Where the queue lives, as error lines name it: SQLite's absolute path, or
    `PostgreSQL at host:port/database` (no user, no password)."""
    parsed = url if isinstance(url, URL) else make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        return database if database in ("", ":memory:") else os.path.abspath(database)
    port = f":{parsed.port}" if parsed.port else ""
    return f"PostgreSQL at {parsed.host or 'localhost'}{port}/{parsed.database or ''}"


def open_problem(url: str) -> str | None:
    """Why `relay serve` could not open the SQLite queue at `url`, found by
    looking (stat, access) without creating anything: `permission denied`,
    `no such directory ...`, `a file is in the way ...`, `read-only file system`.
    None when nothing is visibly wrong, or for PostgreSQL (only connecting tells)."""
    try:
        parsed = normalise_url(url)
    except Exception as exc:  # sqlalchemy's URL parser raises ArgumentError
        return f"bad queue.url: {exc}"
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return _sqlite_problem(location(parsed))


def _sqlite_problem(path: str) -> str | None:
    """`open_problem` for an absolute path. SQLite writes the database and,
    beside it, its -wal and -shm files: the directory must take new files."""
    nearest, missing = path, False  # the nearest part of the path that exists
    while True:
        try:
            found = os.stat(nearest)
            break
        except (FileNotFoundError, NotADirectoryError):
            nearest, missing = os.path.dirname(nearest), True
        except OSError as exc:
            return cause(exc)
    directory = os.path.dirname(path)
    if not missing:  # the database file is there
        if stat.S_ISDIR(found.st_mode):
            return "a directory is in the way"
        if _read_only(path):
            return "read-only file system"
        if not os.access(path, os.R_OK | os.W_OK):
            return "permission denied"
        found, nearest = os.stat(directory), directory
    if not stat.S_ISDIR(found.st_mode):
        return f"a file is in the way: {nearest} is not a directory"
    if _read_only(nearest):
        return "read-only file system"
    if not os.access(nearest, os.W_OK | os.X_OK):
        if nearest != directory:
            return f"no such directory {directory}, and {nearest} does not let us create it"
        return f"permission denied: cannot create files in {directory}"
    return None


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _failure(what: str, engine: Engine, exc: BaseException) -> DatabaseError:
    """`what: location: cause`; for SQLite the cause is looked for on disk first,
    as its own message ("unable to open database file") never says which."""
    where = location(engine.url)
    on_disk = engine.dialect.name == "sqlite" and os.path.isabs(where)
    found = _sqlite_problem(where) if on_disk else None
    return DatabaseError(f"{what}: {where}: {found or _one_line(exc)}")


def _sqlite_setup(engine: Engine, background_checkpoints: bool, lock_timeout: float) -> None:
    """WAL with synchronous=FULL: a commit is on disk before we answer 250.

    With `background_checkpoints` no commit copies the WAL into the database
    file (SQLite's default does that every 1,000 pages, inside the commit of
    whichever message is unlucky): the caller runs `checkpoint()` in a
    thread of its own instead.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={round(lock_timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Debian builds SQLite with SECURE_DELETE, which zeroes every freed page:
        # each delivered body would be written a second time. FAST zeroes
        # deleted content only where that costs no extra I/O (as with a
        # Postfix queue file, the rest is gone when the page is reused).
        cursor.execute("PRAGMA secure_delete=FAST")
        # After a burst (or one huge message) the WAL is cut back to this size
        # when it starts over, instead of keeping its largest size for good.
        cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        if background_checkpoints:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()
        record.info["synchronous"] = "FULL"

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        options = conn.get_execution_options()
        sync = "FULL" if options.get("durable", True) else "NORMAL"
        proxied = conn.connection
        dbapi_connection = proxied.dbapi_connection  # straight to the driver: on every write
        statements = []
        if proxied.info.get("synchronous") != sync:  # it cannot change inside a transaction
            statements.append(f"PRAGMA synchronous={sync}")
        # Writers take the lock at BEGIN, so two writers queue up on
        # busy_timeout instead of failing when a read upgrades to a write.
        statements.append(f"BEGIN {options.get('sqlite_begin', 'IMMEDIATE')}")
        for statement in statements:
            try:
                dbapi_connection.execute(statement)
            except sqlite3.Error as exc:  # as Core would have raised it
                raise DBAPIError.instance(statement, (), exc, sqlite3.Error) from exc
        proxied.info["synchronous"] = sync


def _postgresql_setup(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if not conn.get_execution_options().get("durable", True):
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")


def connect(url: str, *, background_checkpoints: bool = False,
            lock_timeout: float = LOCK_TIMEOUT) -> Engine:
    """An engine for the queue URL; SQLite's directory is created if missing.

    `background_checkpoints`: the caller checkpoints SQLite's WAL itself
    (see `checkpoint`), so commits never do; no effect on PostgreSQL.
    `lock_timeout`: how long a SQLite statement waits for a lock another
    connection holds before failing with "database is locked".

    Every transaction is durable (fsync'd at commit) unless begun on a
    connection with the execution option `durable=False`: then its commit may
    be lost in a power failure, atomically, but never half applied. For state
    that is safe to lose: a lost delivery record means a message is sent again.
    """
    try:
        parsed = normalise_url(url)
    except Exception as exc:  # sqlalchemy's URL parser raises ArgumentError
        raise DatabaseError(f"bad queue.url {url!r}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = location(parsed)
            if problem := _sqlite_problem(path):
                raise DatabaseError(f"cannot open the queue database {path}: {problem}")
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseError(
                    f"cannot create the directory of {path}: {cause(exc)}"
                ) from None
        engine = create_engine(parsed, pool_size=8, max_overflow=8)
        _sqlite_setup(engine, background_checkpoints, lock_timeout)
        if parsed.database and parsed.database != ":memory:":
            _create_private_on_connect(engine, location(parsed))
        return engine
    engine = create_engine(parsed, pool_size=10, max_overflow=10, pool_pre_ping=True)
    _postgresql_setup(engine)
    return engine


def _create_private_on_connect(engine: Engine, path: str) -> None:
    """A new queue file is made 0600 just before SQLite would create it (it would
    otherwise follow the umask): the mail in it is nobody else's. SQLite gives
    -wal and -shm the database file's mode; an existing file keeps its mode.
    At the first connection, not in `connect`, so merely opening an engine
    (as `relay queue` does before finding no database) creates nothing."""

    @event.listens_for(engine, "do_connect")
    def _before_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        # there already; or SQLite's own open names the problem (`_failure`)
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def checkpoints_left_to_caller(engine: Engine) -> bool:
    """Whether `engine` was connected with `background_checkpoints`: then
    somebody must call `checkpoint`, or SQLite's WAL grows without end."""
    if engine.dialect.name != "sqlite":
        return False
    (pages,) = _pragma(engine, "wal_autocheckpoint")
    return bool(pages == 0)


def checkpoint(engine: Engine) -> int:
    """Copy committed WAL frames into SQLite's database file without blocking
    the writer or readers (PASSIVE); the frames still in the WAL afterwards.
    A no-op returning 0 on other databases."""
    if engine.dialect.name != "sqlite":
        return 0
    _busy, frames, copied = _pragma(engine, "wal_checkpoint(PASSIVE)")
    return max(frames - copied, 0)


def _pragma(engine: Engine, pragma: str) -> tuple[Any, ...]:
    """The row a SQLite PRAGMA returns, outside any transaction (our BEGIN
    event would otherwise open one, and a checkpoint cannot run inside it)."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        row: tuple[Any, ...] = cursor.execute(f"PRAGMA {pragma}").fetchone()
        cursor.close()
    finally:
        raw.close()
    return row


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(relay.migrations.__file__).parent))
    return cfg


@dataclass(frozen=True, slots=True)
class Revision:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def revision(engine: Engine) -> Revision:
    """Where the database stands against the revisions we ship."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    assert head is not None
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise _failure("database unreachable", engine, exc) from None
    return Revision(current=current, head=head)


def upgrade(engine: Engine) -> Revision:
    """Migrate to head; refuse a database at a revision we do not know.

    Serialised across processes, so any number of nodes may start at once on
    an empty or old database: PostgreSQL takes a transaction-scoped advisory
    lock first, SQLite's write lock is taken at BEGIN (IMMEDIATE, see
    `connect`). Alembic reads the revision inside that transaction, so a
    process that waited finds the work done and migrates nothing.
    """
    before = revision(engine)
    _refuse_unknown(engine, before.current)
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    cfg = _alembic_config()
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            _refuse_unknown(engine, MigrationContext.configure(conn).get_current_revision())
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SQLAlchemyError as exc:
        raise _failure("migration failed", engine, exc) from None
    return revision(engine)


def _refuse_unknown(engine: Engine, current: str | None) -> None:
    if current is not None and not is_known(current):
        raise DatabaseError(
            f"database {location(engine.url)} is at unknown revision {current} "
            "(newer than this relay?)"
        )


def ensure_ready(engine: Engine) -> Revision:
    """For `relay serve`: migrate an empty or older database, refuse an unknown one."""
    rev = revision(engine)
    if rev.current is None:
        return upgrade(engine)
    if rev.current != rev.head:
        return upgrade(engine)  # refuses an unknown (newer) revision
    return rev


def is_known(rev: str) -> bool:
    """True for a revision shipped in migrations/."""
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    script = ScriptDirectory.from_config(_alembic_config())
    try:
        return script.get_revision(rev) is not None
    except CommandError:
        return False


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
