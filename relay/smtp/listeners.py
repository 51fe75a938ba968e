"""The SMTP listening sockets: bind every `smtp.listen` address, and stop politely.

Owns the servers' lifetime and the order of a graceful stop: stop accepting,
tell idle sessions 421 at once, let a session that is receiving or storing a
message finish it, and once the caller's grace (`smtp.shutdown_grace`) is
over, cut the ones still receiving. Refuses anything a session does, the
replies included: that is `smtpd.py`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from relay.core.clock import Clock
from relay.core.config import Config
from relay.core.oserror import ListenError
from relay.core.room import FreeSpace
from relay.queue.gather import Gathering
from relay.smtp.policy import Policy
from relay.smtp.server import RelaySMTP
from relay.smtp.shared import OnEtrn, Shared, SmtpMetrics, SmtpStats, Submit
from relay.smtp.spf import SpfCheck


class Listeners:
    """The running SMTP servers, and a way to stop them politely."""

    def __init__(self, servers: list[asyncio.Server], shared: Shared) -> None:
        self._servers = servers
        self._shared = shared

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs actually bound (port 0 in config is resolved here)."""
        return [
            (str(sock.getsockname()[0]), int(sock.getsockname()[1]))
            for server in self._servers for sock in server.sockets
        ]

    @property
    def stats(self) -> SmtpStats:
        return self._shared.stats

    @property
    def free_space(self) -> FreeSpace:
        """The queue file system's free-space check MAIL makes (also `/healthz`'s)."""
        return self._shared.free_space

    @property
    def sessions_active(self) -> int:
        return self._shared.limits.connections

    def stop_accepting(self) -> None:
        """Close the listening sockets; sessions already connected go on."""
        for server in self._servers:
            server.close()

    def reconfigure(self, config: Config, policy: Policy,
                    tls_context: ssl.SSLContext | None, spf: SpfCheck | None = None) -> None:
        """A reload: sessions that connect from now on work under `config`."""
        self._shared.reconfigure(config, policy, tls_context, spf)

    async def wait_sessions(self, timeout: float | None = None) -> bool:
        """Wait until every connection has ended; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._shared.idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop accepting; idle sessions hear 421 now, one receiving or storing a
        message finishes it (and hears its reply) first."""
        self.stop_accepting()
        self._shared.closing = True
        for proto in list(self._shared.protocols):
            proto.shutdown()

    def stop_receiving(self) -> None:
        """After close() and a grace period: end the sessions still receiving a
        message, so a client sending slowly (or a byte at a time, which no idle
        timeout catches) cannot hold the shutdown; their messages were never
        acknowledged. Those storing one finish and hear their reply."""
        for proto in list(self._shared.protocols):
            proto.stop_receiving()

    def abort(self) -> None:
        """Close every connection now, mid-DATA or not (nothing half-received is kept)."""
        self.close()
        for proto in list(self._shared.protocols):
            if proto.transport is not None:
                proto.transport.close()

    async def wait_closed(self) -> None:
        """After close(): wait for sessions, their tasks and pending commits to end."""
        for server in self._servers:
            await server.wait_closed()
        await self._shared.idle.wait()
        while self._shared.finishing:
            await asyncio.gather(*list(self._shared.finishing), return_exceptions=True)

    async def __aenter__(self) -> Listeners:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The STARTTLS server context, when smtp.tls_cert and smtp.tls_key are set;
    read from the files each time, so a reload picks up a renewed certificate.

    TLS 1.2 at least (older versions have known breaks and no client worth
    serving still needs them), no compression (CRIME), and our cipher order
    rather than the client's, so a client offering a weak suite first still
    gets a strong one."""
    if not config.smtp.tls_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(config.smtp.tls_cert, config.smtp.tls_key)
    return context


async def start_listeners(
    config: Config,
    submit: Submit,
    *,
    id_factory: Callable[[], str],
    clock: Clock,
    on_etrn: OnEtrn | None = None,
    policy: Policy | None = None,
    metrics: SmtpMetrics | None = None,
    spf: SpfCheck | None = None,
    gathering: Gathering | None = None,
) -> Listeners:
    """Listen on every smtp.listen address; returns once all are bound, or
    raises `ListenError` naming the address that could not be (and why).

    `submit` returns an awaitable that is done only once the message is
    durably stored (and raises on failure); `on_etrn(domain)` makes that
    domain's mail due now; `policy` defaults to one built from `config`;
    `metrics` (a `relay.ops.metrics.Metrics`) gets accepted messages, rejections
    by reason and open sessions; `spf` checks each MAIL FROM (None: no SPF);
    `gathering` (the store's) counts each message on its way from MAIL FROM to the writer.
    """
    loop = asyncio.get_running_loop()
    shared = Shared(config, policy or Policy(config), submit, id_factory, clock, on_etrn,
                    tls_context(config), loop, metrics, spf, gathering)
    backlog = max(100, min(config.smtp.max_connections, 4096))
    servers: list[asyncio.Server] = []
    try:
        for address in config.smtp.listen:
            try:
                servers.append(await loop.create_server(
                    lambda: RelaySMTP(shared), address.host, address.port,
                    reuse_address=True, reuse_port=config.smtp.reuse_port or None,
                    backlog=backlog,
                ))
            except OSError as exc:
                raise ListenError("SMTP", str(address), exc) from exc
    except BaseException:
        for server in servers:
            server.close()
            await server.wait_closed()
        raise
    return Listeners(servers, shared)
