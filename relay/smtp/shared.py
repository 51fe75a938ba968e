"""What every SMTP session shares: config, policy, limits, bookkeeping, handler hooks.

Owns the one `Shared` object all sessions of all listeners hold, with the
`Settings` a session takes when it connects (swapped whole by a reload, so a
new config applies to sessions that start after it and never to one half
way through; a session reads them without a lock or a copy), admitting
and releasing connections against the limits, counting accepted and rejected
mail for the metrics, the room left (free space for the queue, memory for
messages being received, `relay.core.room`), the count of messages on their
way to the queue's writer (`relay.queue.gather`), keeping the tasks that
must finish before a shutdown completes (shielding a commit from a client
that hangs up), the stateless aiosmtpd handler with the hooks aiosmtpd
calls (EHLO, NOOP, RSET, QUIT), and the client's IP as text. Refuses the
protocol itself (`server.py`), reply wording (`replies.py`) and sockets
(`listeners.py`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.core.clock import Clock
from relay.core.config import Config
from relay.core.room import Budget, FreeSpace
from relay.queue.gather import Arrival, Gathering
from relay.queue.rows import NewMessage
from relay.smtp.limits import ClientLimits
from relay.smtp.policy import Policy
from relay.smtp.spf import SpfCheck

log = logging.getLogger("relay.smtp.server")


class Connection(Protocol):
    """What the shared state needs of one session (`server.RelaySMTP` is one):
    its client, whether it was admitted, its task, and how to end it."""

    client_ip: str
    admitted: bool
    handler_task: asyncio.Task[None] | None
    transport: asyncio.BaseTransport | None

    def shutdown(self) -> None: ...

    def stop_receiving(self) -> None: ...

    def ehlo_lines(self) -> list[str]: ...

Submit = Callable[[NewMessage], Awaitable[None]]
OnEtrn = Callable[[str], Awaitable[object]]

NO_TIMEOUT = 10.0**9  # what a configured timeout of 0 means


def client_ip(peer: object) -> str:
    """The client's IP as text; IPv4-mapped IPv6 addresses as plain IPv4."""
    if not isinstance(peer, tuple) or not peer:
        return "unknown"
    return _normal_ip(str(peer[0]))


@functools.lru_cache(maxsize=4096)
def _normal_ip(host: str) -> str:
    """`client_ip` for a peer host; cached, as busy senders connect again and
    again from the same few addresses and parsing one is not free."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class SmtpMetrics(Protocol):
    """What we report to `relay.ops.metrics.Metrics` (relay_smtp_*)."""

    def accepted(self, messages: int = 1) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def session_started(self) -> None: ...
    def session_ended(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Settings:
    """What a session reads of the config and the policy built from it; taken
    once per connection, so one attribute read is all a reload costs a session."""

    policy: Policy
    tls_context: ssl.SSLContext | None
    max_size: int
    max_recipients: int
    command_timeout: float
    data_timeout: float
    min_data_rate: int
    max_session_time: float
    greet_pause: float
    etrn_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    tls_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    spf: SpfCheck | None = None  # None: no SPF at MAIL FROM

    @classmethod
    def build(cls, config: Config, policy: Policy, tls_context: ssl.SSLContext | None,
              spf: SpfCheck | None = None) -> Settings:
        smtp = config.smtp
        return cls(
            policy=policy, tls_context=tls_context, spf=spf,
            max_size=smtp.max_message_size, max_recipients=smtp.max_recipients,
            command_timeout=smtp.command_timeout or NO_TIMEOUT,
            data_timeout=smtp.data_timeout or NO_TIMEOUT,
            min_data_rate=smtp.min_data_rate, max_session_time=smtp.max_session_time,
            greet_pause=smtp.greet_pause,
            etrn_networks=tuple(ipaddress.ip_network(n) for n in smtp.etrn_clients),
            tls_networks=tuple(ipaddress.ip_network(n) for n in smtp.require_tls_from),
        )

    def etrn_allowed(self, ip: str) -> bool:
        return _within(ip, self.etrn_networks)

    def tls_required(self, ip: str) -> bool:
        """smtp.require_tls_from: this client must STARTTLS before MAIL."""
        return bool(self.tls_networks) and _within(ip, self.tls_networks)


def _within(ip: str,
            networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in networks)


@dataclass
class SmtpStats:
    """Counters for the metrics endpoint (relay_smtp_*)."""

    accepted: int = 0
    rejections: collections.Counter[str] = field(default_factory=collections.Counter)


class Shared:
    """What every session of every listener shares: settings, limits, bookkeeping."""

    def __init__(
        self, config: Config, policy: Policy, submit: Submit, id_factory: Callable[[], str],
        clock: Clock, on_etrn: OnEtrn | None, tls_context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop, metrics: SmtpMetrics | None,
        spf: SpfCheck | None = None, gathering: Gathering | None = None,
    ) -> None:
        smtp = config.smtp
        self.settings = Settings.build(config, policy, tls_context, spf)
        self.hostname = config.node.hostname  # node.*: bound at start, as the listeners are
        self.shutting_down = f"421 4.3.2 {self.hostname} Service shutting down"
        self.submit = submit
        self.id_factory = id_factory
        self.clock = clock
        self.on_etrn = on_etrn
        self.loop = loop
        self.handler = RelayHandler()  # stateless: one for every session
        self.handle_hooks = handle_hooks(self.handler)
        self.ehlo_hook_version = ehlo_hook_version(self.handle_hooks)
        self.stats = SmtpStats()
        self.metrics = metrics
        self.closing = False
        self.protocols: set[Connection] = set()  # every live connection, refused ones too
        self.limits = ClientLimits(smtp.max_connections, smtp.max_connections_per_ip,
                                   smtp.max_messages_per_ip_per_minute, clock,
                                   smtp.etrn_interval)
        self.finishing: set[asyncio.Future[Any]] = set()  # handler tasks and submits
        self.idle = asyncio.Event()
        self.idle.set()
        self.inflight = Budget(smtp.max_inflight_data)  # DATA held by all sessions
        self.gathering = gathering or Gathering()  # messages on their way to the queue's writer
        path = config.queue.sqlite_path
        self.free_space = FreeSpace(path.parent if path is not None else None,
                                    config.queue.min_free_space)

    def reconfigure(self, config: Config, policy: Policy,
                    tls_context: ssl.SSLContext | None, spf: SpfCheck | None = None) -> None:
        """A reload: sessions that connect from now on take the new settings;
        the connection limits apply at once to the counts kept so far."""
        self.settings = Settings.build(config, policy, tls_context, spf)
        smtp = config.smtp
        self.limits.max_connections = smtp.max_connections
        self.limits.max_connections_per_ip = smtp.max_connections_per_ip
        self.limits.max_messages_per_minute = smtp.max_messages_per_ip_per_minute
        self.limits.etrn_interval = smtp.etrn_interval
        self.inflight.limit = smtp.max_inflight_data
        self.free_space.minimum = config.queue.min_free_space
        self.gathering.delay = config.queue.commit_delay

    def reject(self, reason: str) -> None:
        self.stats.rejections[reason] += 1
        if self.metrics is not None:
            self.metrics.rejected(reason)

    def accepted(self) -> None:
        self.stats.accepted += 1
        if self.metrics is not None:
            self.metrics.accepted()

    def admit(self, proto: Connection) -> str | None:
        """Count a new connection in, or return the 421 greeting that refuses it."""
        self.protocols.add(proto)
        self.idle.clear()
        ip = proto.client_ip
        if self.closing:
            return self.shutting_down
        if not self.limits.connect(ip):
            self.reject("connection_limit")
            return f"421 4.7.0 {self.hostname} Error: too many connections from {ip}"
        proto.admitted = True
        if self.metrics is not None:
            self.metrics.session_started()
        return None

    def release(self, proto: Connection) -> None:
        """Forget a closed connection (safe to call twice)."""
        if proto not in self.protocols:
            return
        self.protocols.discard(proto)
        if proto.admitted:
            self.limits.disconnect(proto.client_ip)
            if self.metrics is not None:
                self.metrics.session_ended()
        self.keep(proto.handler_task)
        if not self.protocols:
            self.idle.set()

    def keep(self, future: asyncio.Future[Any] | None) -> None:
        """Remember a task that must finish before wait_closed() returns."""
        if future is None or future.done():
            return
        self.finishing.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self.finishing.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: the session logged it if it still cared

    async def store(self, message: NewMessage, arrival: Arrival | None = None) -> None:
        """Submit, shielded: a client hanging up must not cut a commit in half.
        `arrival` ends first: the writer need no longer wait for this message."""
        if arrival is not None:
            arrival.end()
        task = asyncio.ensure_future(self.submit(message))
        self.keep(task)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(_orphan_outcome, message.id))
            raise


def _orphan_outcome(queue_id: str, task: asyncio.Future[None]) -> None:
    """Log how a commit ended whose client left before hearing the answer."""
    if task.cancelled() or task.exception() is not None:
        log.warning("%s: client went away during the commit, which failed; nothing kept",
                    queue_id)
    else:
        log.warning("%s: client went away during the commit, which succeeded; it will be "
                    "delivered, and a retry by the client will duplicate it", queue_id)


class RelayHandler:
    """aiosmtpd hooks for the replies that have a hook: EHLO, NOOP, RSET, QUIT."""

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the "new" hook form leaves this to us
        return cast(Connection, server).ehlo_lines()

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: Envelope,
                          arg: str) -> str:
        return "250 2.0.0 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Bye"


def handle_hooks(handler: object) -> dict[str, Callable[..., Any]]:
    """The handler's `handle_*` hooks by verb, as aiosmtpd's SMTP.__init__ finds them."""
    return {name.replace("handle_", ""): getattr(handler, name)
            for name in dir(handler) if name.startswith("handle_")}


def ehlo_hook_version(hooks: dict[str, Callable[..., Any]]) -> str:
    """aiosmtpd's `_ehlo_hook_ver`: the 5-argument ("new") handle_EHLO is the one
    whose returned lines replace the stock EHLO reply."""
    if len(inspect.signature(hooks["EHLO"]).parameters) != 5:
        raise TypeError("handle_EHLO must take (server, session, envelope, hostname, responses)")
    return "new"

