"""The metrics endpoint: `/metrics` and `/healthz` on aiohttp's low-level server.

Owns what the endpoint answers: `GET /metrics` is the Prometheus text format
(0.0.4) of the registry it is given, generated in a dedicated thread because
the queue collector queries the database; concurrent scrapes share one
generation. `GET /healthz` is 200 `ok` or 503 and one line saying why. HEAD
works on both; other paths 404, other methods 405, an HTTP/1.1 request
without Host 400, a head over 8 KiB 431 (or aiohttp's 400). One request per
connection, a deadline for the request head, a cap on simultaneous connections.

Refuses to parse HTTP (aiohttp does), to know what a metric is
(`metrics.py`) or how the database is reached (`Queue.ping`): it is handed
a registry and a health callable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry, generate_latest

from relay.core.values import HostPort

log = logging.getLogger(__name__)

Health = Callable[[], Awaitable[tuple[bool, str]]]

MAX_LINE = 8190  # request line, and each header line
MAX_HEADERS = 8192  # all header lines together
READ_TIMEOUT = 5.0  # for the whole request head
SCRAPE_TIMEOUT = 10.0  # Prometheus' own default scrape timeout
HEALTH_TIMEOUT = 2.0
MAX_CONNECTIONS = 32
SHUTDOWN_TIMEOUT = 5.0  # for requests still being answered when the relay stops

# Prometheus' text format 0.0.4, spelt out: prometheus_client's constant for it
# moved between versions.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_PATHS = ("/metrics", "/healthz")


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
    """`/healthz`: the SMTP listener is up, there is room (`room()` says what is
short, if anything), writes commit (`writes(timeout)` says why not, if not)
and the database answers in time.

    `listening()` is called on the event loop; `ping()` blocks (it is
    `Queue.ping`, raising when the database does not answer) and runs in a
    thread of its own, bounded by `timeout`.
    """

    def __init__(
        self,
        listening: Callable[[], bool],
        ping: Callable[[], None],
        timeout: float = HEALTH_TIMEOUT,
        room: Callable[[], str | None] = lambda: None,
        writes: Callable[[float], Awaitable[str | None]] | None = None,
    ) -> None:
        self._listening = listening
        self._room = room
        self._writes = writes
        self._ping = _Shared(ping, "relay-health")
        self._timeout = timeout

    async def __call__(self) -> tuple[bool, str]:
        if not self._listening():
            return False, "smtp listener is not up"
        short = self._room()  # e.g. the queue's file system short of space
        if short is not None:
            return False, short
        stuck = await self._writes(self._timeout) if self._writes is not None else None
        if stuck is not None:  # e.g. SQLite's write lock held by another process
            return False, stuck
        try:
            await self._ping(self._timeout)
        except TimeoutError:
            return False, f"database did not answer within {self._timeout:g}s"
        except Exception as exc:
            return False, f"database unreachable: {_one_line(exc)}"
        return True, "ok"

    def close(self) -> None:
        self._ping.close()


class MetricsServer:
    """The listening endpoint: `sockets` (port 0 picks one), `close()`, `wait_closed()`."""

    def __init__(self, listener: asyncio.Server, web_server: _Server) -> None:
        self._listener = listener
        self._web_server = web_server

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._listener.sockets)

    def close(self) -> None:
        self._listener.close()

    async def wait_closed(self) -> None:
        await self._web_server.shutdown(SHUTDOWN_TIMEOUT)
        await self._listener.wait_closed()
        self._web_server.close()


async def start_http(
    address: HostPort,
    registry: CollectorRegistry,
    health: Health,
    *,
    read_timeout: float = READ_TIMEOUT,
    scrape_timeout: float = SCRAPE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> MetricsServer:
    """Listen on `address` and serve until `close()`."""
    endpoint = _Endpoint(registry, health, scrape_timeout)
    web_server = _Server(
        endpoint.handle,
        read_timeout=read_timeout,
        max_connections=max_connections,
        access_log=None,
        max_line_size=MAX_LINE,
        max_field_size=MAX_LINE,
    )
    endpoint.server = web_server
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(web_server, address.host, address.port)
    return MetricsServer(listener, web_server)


class _Server(web.Server):
    """aiohttp's low-level server, with the two limits it lacks: a connection
    that has not sent a whole request head within `read_timeout` is closed,
    and connections over `max_connections` are dropped unanswered."""

    def __init__(self, handler: Any, *, read_timeout: float, max_connections: int,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._deadlines: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if len(self.connections) >= self._max_connections:
            transport.abort()
            return
        super().connection_made(handler, transport)
        loop = asyncio.get_running_loop()
        self._deadlines[transport] = loop.call_later(self._read_timeout, transport.abort)

    def connection_lost(
        self, handler: RequestHandler, exc: BaseException | None = None
    ) -> None:
        super().connection_lost(handler, exc)
        for transport in [t for t in self._deadlines if t.is_closing()]:
            self._deadlines.pop(transport).cancel()

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """The head arrived in time: the deadline no longer applies."""
        if transport is not None and (deadline := self._deadlines.pop(transport, None)):
            deadline.cancel()

    def close(self) -> None:
        for deadline in self._deadlines.values():
            deadline.cancel()
        self._deadlines.clear()


class _Endpoint:
    def __init__(self, registry: CollectorRegistry, health: Health, scrape_timeout: float) -> None:
        self._scrape = _Shared(lambda: generate_latest(registry), "relay-metrics")
        self._health = health
        self._scrape_timeout = scrape_timeout
        self.server: _Server | None = None  # set once the server exists

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.server is not None:
            self.server.request_started(request.transport)
        status, content_type, body = await self._route(request)
        response = web.Response(
            status=status,
            body=body,
            headers={"Content-Type": content_type, "Cache-Control": "no-store"},
        )
        if status == 405:
            response.headers["Allow"] = "GET, HEAD"
        response.force_close()  # one request per connection
        return response

    async def _route(self, request: web.BaseRequest) -> tuple[int, str, bytes]:
        if sum(len(name) + len(value) + 4 for name, value in request.raw_headers) > MAX_HEADERS:
            return 431, _TEXT, b"request head too large\n"
        if request.version >= (1, 1) and "Host" not in request.headers:
            return 400, _TEXT, b"missing Host header\n"
        if request.path not in _PATHS:
            return 404, _TEXT, b"not found\n"
        if request.method not in ("GET", "HEAD"):
            return 405, _TEXT, b"method not allowed\n"
        if request.path == "/healthz":
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
        return 200, METRICS_CONTENT_TYPE, body


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__
