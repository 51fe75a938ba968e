"""The metrics endpoint: a tiny HTTP/1.1 server for `/metrics` and `/healthz`.

Owns the socket on `metrics.listen`, request parsing (one request per
connection, bounded head, read and write deadlines, a cap on simultaneous
connections) and the health verdict's wire form. `GET /metrics` is the
Prometheus text format (0.0.4) of the registry it is given, generated in a
dedicated thread because the queue collector queries the database; concurrent
scrapes share one generation. `GET /healthz` is 200 `ok` or 503 and one line
saying why. HEAD works on both; other paths 404, other methods 405,
malformed requests 400.

Refuses to know what a metric is (`metrics.py`) or how the database is
reached (`Queue.ping`): it is handed a registry and a health callable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from relay.core.config import HostPort

log = logging.getLogger(__name__)

Health = Callable[[], Awaitable[tuple[bool, str]]]

MAX_HEAD = 8192  # request line and headers, in all
READ_TIMEOUT = 5.0  # for the whole request head
WRITE_TIMEOUT = 10.0
SCRAPE_TIMEOUT = 10.0  # Prometheus' own default scrape timeout
HEALTH_TIMEOUT = 2.0
MAX_CONNECTIONS = 32

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Shared:
    """Runs a blocking function in one dedicated thread; concurrent callers
    share the run in flight, so a hung database holds one thread, not one per
    request."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._fn = fn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._running: asyncio.Future[Any] | None = None

    async def __call__(self, timeout: float) -> Any:
        if self._running is None or self._running.done():
            loop = asyncio.get_running_loop()
            self._running = loop.run_in_executor(self._executor, self._fn)
            # Everyone may have timed out by the time it ends: retrieve its result.
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.wait_for(asyncio.shield(self._running), timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class HealthCheck:
    """`/healthz`: the SMTP listener is up and the database answers in time.

    `listening()` is called on the event loop; `ping()` blocks (it is
    `Queue.ping`, raising when the database does not answer) and runs in a
    thread of its own, bounded by `timeout`.
    """

    def __init__(
        self,
        listening: Callable[[], bool],
        ping: Callable[[], None],
        timeout: float = HEALTH_TIMEOUT,
    ) -> None:
        self._listening = listening
        self._ping = _Shared(ping, "relay-health")
        self._timeout = timeout

    async def __call__(self) -> tuple[bool, str]:
        if not self._listening():
            return False, "smtp listener is not up"
        try:
            await self._ping(self._timeout)
        except TimeoutError:
            return False, f"database did not answer within {self._timeout:g}s"
        except Exception as exc:
            return False, f"database unreachable: {_one_line(exc)}"
        return True, "ok"

    def close(self) -> None:
        self._ping.close()


async def start_http(
    address: HostPort,
    registry: CollectorRegistry,
    health: Health,
    *,
    read_timeout: float = READ_TIMEOUT,
    scrape_timeout: float = SCRAPE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> asyncio.Server:
    """Listen on `address` (port 0 picks one: see `server.sockets`) and serve."""
    handler = _Handler(registry, health, read_timeout, scrape_timeout, max_connections)
    return await asyncio.start_server(handler, address.host, address.port, limit=MAX_HEAD)


class _Handler:
    def __init__(
        self,
        registry: CollectorRegistry,
        health: Health,
        read_timeout: float,
        scrape_timeout: float,
        max_connections: int,
    ) -> None:
        self._scrape = _Shared(lambda: generate_latest(registry), "relay-metrics")
        self._health = health
        self._read_timeout = read_timeout
        self._scrape_timeout = scrape_timeout
        self._max_connections = max_connections
        self._connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= self._max_connections:
            writer.transport.abort()
            return
        self._connections += 1
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            writer.transport.abort()
        except Exception:
            log.exception("metrics endpoint: request failed")
            writer.transport.abort()
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            async with asyncio.timeout(self._read_timeout):
                method, path = await _read_request(reader)
        except _BadRequest as exc:
            status, content_type, body = exc.status, _TEXT, f"{exc}\n".encode()
        except TimeoutError:
            status, content_type, body = 408, _TEXT, b"request timeout\n"
        else:
            head_only = method == "HEAD"
            status, content_type, body = await self._route(method, path)
        headers = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("ascii"))
        if not head_only:
            writer.write(body)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path not in ("/metrics", "/healthz"):
            return 404, _TEXT, b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"method not allowed\n"
        if path == "/healthz":
            try:
                ok, reason = await self._health()
            except Exception as exc:
                ok, reason = False, f"health check failed: {_one_line(exc)}"
            return (200, _TEXT, b"ok\n") if ok else (503, _TEXT, f"{reason}\n".encode())
        try:
            body: bytes = await self._scrape(self._scrape_timeout)
        except TimeoutError:
            return 503, _TEXT, b"metrics generation timed out\n"
        except Exception as exc:
            log.exception("metrics endpoint: generation failed")
            return 500, _TEXT, f"metrics generation failed: {_one_line(exc)}\n".encode()
        return 200, CONTENT_TYPE_PLAIN_0_0_4, body


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """(method, path) of a well-formed HTTP/1.x request head, or _BadRequest."""
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line longer than the stream limit
            raise _BadRequest(431, "request head too large") from None
        size += len(line)
        if size > MAX_HEAD:
            raise _BadRequest(431, "request head too large")
        if not line.endswith(b"\n"):
            raise _BadRequest(400, "incomplete request")
        if line in (b"\r\n", b"\n"):
            if lines:
                break
            continue  # RFC 9112 2.2: ignore an empty line before the request line
        lines.append(line.rstrip(b"\r\n"))
    request_line, *header_lines = lines
    parts = request_line.split(b" ")
    if (
        len(parts) != 3
        or not _TOKEN.fullmatch(parts[0])
        or not _TARGET.fullmatch(parts[1])
        or not _VERSION.fullmatch(parts[2])
    ):
        raise _BadRequest(400, "malformed request line")
    host = False
    for header in header_lines:
        name, colon, _ = header.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _BadRequest(400, "malformed header")
        host = host or name.lower() == b"host"
    if parts[2] == b"HTTP/1.1" and not host:
        raise _BadRequest(400, "missing Host header")
    path = parts[1].split(b"?", 1)[0].decode("ascii")
    return parts[0].decode("ascii"), path


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__
