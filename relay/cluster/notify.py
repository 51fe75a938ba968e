"""Wake-ups: "mail is due now, look again", from any process to the running relays.

Owns the channel for each backend and both of its ends. PostgreSQL:
`NOTIFY mx_relay_wake` after the change commits, and a `LISTEN` on a
dedicated connection in a thread of its own that reconnects when the server
goes away. SQLite (one node): a unix datagram socket keyed to the queue file,
`<database>.wake` beside it (with the file's permissions, so whoever may
change the queue may wake its relay), or an abstract socket named after the
file's path when that path is too long for a socket address.

Sending is best effort: no relay running, a stale socket or a database that
refuses the NOTIFY cost nothing, since the scheduler's poll still finds the
work. Refuses payloads and queue contents: a wake-up only means "look for due
work now"; what is due is read from the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy import Engine

log = logging.getLogger("relay.cluster.notify")

CHANNEL = "mx_relay_wake"
SOCKET_SUFFIX = ".wake"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, one of them the final NUL
RECONNECT_MAX = 30.0  # seconds between attempts to get the LISTEN connection back
CONNECT_TIMEOUT = 10  # seconds, for the LISTEN connection


def notify(engine: Engine) -> None:
    """Tell the relays running on `engine`'s queue that mail is due now.

    Call it after the change has committed (a relay woken earlier would not
    see it). Never raises for a relay that is not there to hear it.
    """
    if engine.dialect.name == "postgresql":
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"NOTIFY {CHANNEL}")
                conn.commit()
        except SQLAlchemyError as exc:
            log.debug("no wake-up sent: %s", exc)
        return
    address = sqlite_address(engine.url.database)
    if address is None:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # nobody listening, or its buffer is full
            sock.sendto(b"wake", address)


def sqlite_address(database: str | None) -> str | None:
    """The wake-up socket of a SQLite queue file; None for an in-memory database."""
    if not database or database == ":memory:":
        return None
    path = os.path.realpath(database) + SOCKET_SUFFIX
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:32]
    return f"\0mx-relay-wake-{digest}"  # Linux's abstract namespace: no length limit


class Listener(Protocol):
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def close(self) -> None: ...


def listener(engine: Engine, on_wake: Callable[[], None]) -> Listener:
    """The receiving end for `engine`'s queue; `on_wake` runs on the event loop."""
    if engine.dialect.name == "postgresql":
        url = engine.url.set(drivername="postgresql")
        return PostgresListener(url.render_as_string(hide_password=False), on_wake)
    address = sqlite_address(engine.url.database)
    if address is None:
        return _Deaf()
    return SocketListener(address, on_wake)


class _Deaf:
    """An in-memory queue has no other process to hear from."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def close(self) -> None:
        pass


class SocketListener:
    """SQLite: a datagram socket read by the event loop itself."""

    def __init__(self, address: str, on_wake: Callable[[], None]) -> None:
        self.address = address
        self._on_wake = on_wake
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inode: int | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind, or log why not and leave the poll to find flushed mail."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            if not self.address.startswith("\0"):
                self._remove_stale()
            sock.bind(self.address)
            if not self.address.startswith("\0"):
                self._inode = os.stat(self.address).st_ino
                self._match_database_mode()
        except OSError as exc:
            sock.close()
            log.warning("no wake-up socket at %s (%s): flushes are seen at the next poll",
                        self.address, exc.strerror or exc)
            return
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)

    def _remove_stale(self) -> None:
        """A relay killed without its cleanup leaves its socket behind."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.address).st_mode):
                os.unlink(self.address)

    def _match_database_mode(self) -> None:
        database = self.address[: -len(SOCKET_SUFFIX)]
        with contextlib.suppress(OSError):
            os.chmod(self.address, stat.S_IMODE(os.stat(database).st_mode) & 0o666)

    def _readable(self) -> None:
        assert self._sock is not None
        woken = False
        for _ in range(256):  # drain what queued up: many wake-ups are one
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            woken = True
        if woken:
            self._on_wake()

    def close(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        if self._inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.address).st_ino == self._inode:  # not a successor's
                    os.unlink(self.address)


class PostgresListener:
    """PostgreSQL: `LISTEN` on a connection of its own, in a thread.

    The thread waits on the connection's socket and on a pipe that `close`
    writes to, so stopping is immediate. After a reconnect it wakes the relay
    once: a NOTIFY sent while the connection was down is lost.
    """

    def __init__(self, conninfo: str, on_wake: Callable[[], None]) -> None:
        self._conninfo = conninfo
        self._on_wake = on_wake
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="wake-listener", daemon=True)
        self.listening = threading.Event()  # set while a LISTEN connection is up

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wake(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._on_wake)

    def _stopped(self, timeout: float | None) -> bool:
        """Wait up to `timeout` for `close`; True once it has been called."""
        ready, _, _ = select.select([self._stop_r], [], [], timeout)
        return bool(ready)

    def _run(self) -> None:
        import psycopg

        failures = 0
        while True:
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True,
                                       connect_timeout=CONNECT_TIMEOUT)
            except psycopg.Error as exc:
                failures += 1
                delay = min(RECONNECT_MAX, 2.0 ** (failures - 1))
                log.warning("wake-ups: cannot LISTEN (%s); again in %g s",
                            str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                            delay)
                if self._stopped(delay):
                    return
                continue
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                self.listening.set()
                if failures:
                    log.info("wake-ups: listening again")
                    self._wake()
                failures = 0
                if self._listen(conn):
                    return
            except psycopg.Error as exc:
                log.warning("wake-ups: LISTEN connection lost (%s)", exc)
                failures = 1
            finally:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    conn.close()
            if self._stopped(0):
                return

    def _listen(self, conn: psycopg.Connection[Any]) -> bool:
        """Pass notifications on until `close` (True) or the connection fails (raises)."""
        import psycopg

        pgconn = conn.pgconn
        while True:
            ready, _, _ = select.select([self._stop_r, pgconn.socket], [], [])
            if self._stop_r in ready:
                return True
            pgconn.consume_input()  # raises once the server has gone
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                raise psycopg.OperationalError("connection closed")
            woken = False
            while pgconn.notifies() is not None:
                woken = True
            if woken:
                self._wake()
