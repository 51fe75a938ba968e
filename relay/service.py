"""`relay serve`: wires listener, scheduler and store together, and handles signals.

Owns process lifetime: migrate or refuse the database, start the SMTP
listeners (a listener that cannot bind is named, SMTP or metrics, with its
address and the cause) and the scheduler, stop on SIGTERM/SIGINT by closing
the listeners first, letting in-flight deliveries finish (or putting them
back), flushing the last commits and exiting 0; a second signal during all
that stops at once (exit 1). SIGHUP re-reads the config (`relay.reload`) and
hands each running part its new settings through `_prepare_reload`. Started
as root with `node.user` set, it drops to that user once its sockets are bound
and its queue is open (`relay.core.privileges`). Refuses
business logic: each part lives in its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import ssl
from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import Engine

from relay.cluster import notify
from relay.cluster.nodes import Heartbeat, this_node
from relay.core import config as configuration
from relay.core import maillog, privileges
from relay.core.clock import Clock, SystemClock
from relay.core.config import Config, ConfigError
from relay.core.dnscache import new_cache
from relay.core.oserror import ListenError, cause
from relay.core.recipients import KnownRecipient, Learned
from relay.delivery.callout import CalloutClient
from relay.delivery.outcomes import rules_from_config
from relay.delivery.resolver import DnsResolver, Identity
from relay.delivery.scheduler import Limits, Scheduler
from relay.delivery.transport import SmtpTransport, verifying_tls_context
from relay.ops.http import HealthCheck, start_http
from relay.ops.metrics import Metrics
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.gather import Gathering
from relay.queue.rows import NewMessage, domain_of, new_queue_id
from relay.queue.store import Store
from relay.reload import Reloader
from relay.smtp.callouts import Callouts
from relay.smtp.listeners import Listeners, start_listeners, tls_context
from relay.smtp.policy import Policy
from relay.smtp.spf import SpfCheck
from relay.smtp.verify import REFRESH_INTERVAL, KnownRecipients

log = logging.getLogger("relay.service")

SHUTDOWN_GRACE = 20.0  # seconds in-flight deliveries get to finish on SIGTERM
EXIT_STOPPED_NOW = 1  # the exit status after a second signal cut the graceful stop short


def identity(config: Config) -> Identity:
    """Who we are for MX loop avoidance: our name, listen IPs and node.addresses."""
    addresses = {a.host for a in config.smtp.listen if a.host not in ("0.0.0.0", "::")}
    addresses.update(config.node.addresses)
    return Identity(hostname=config.node.hostname, addresses=frozenset(addresses))


def _limits(config: Config, poll_interval: float | None) -> Limits:
    limits = Limits(
        concurrency=config.delivery.concurrency,
        per_destination=config.delivery.per_destination_concurrency,
        lease=config.queue.lease,
        log_retention=config.queue.log_retention,
    )
    if poll_interval is not None:
        limits = dataclasses.replace(limits, poll_interval=poll_interval)
    return limits


def _resolver(config: Config, dns: _Dns) -> DnsResolver:
    return DnsResolver(
        nameservers=config.dns.nameserver_addresses,
        timeout=config.dns.timeout,
        identity=identity(config),
        port=config.delivery.port,
        cache=dns.cache,
    )


class _Dns:
    """The process's DNS answer cache (MX lookups and SPF share it) and the
    current SPF checker, kept across a reload unless what it uses changed."""

    def __init__(self) -> None:
        self.cache = new_cache()
        self.spf: SpfCheck | None = None
        self._made_for: tuple[object, ...] | None = None

    def spf_for(self, config: Config) -> SpfCheck | None:
        """The checker for `config` (None with `smtp.spf` off): the current one
        when `[dns]` and the node name are unchanged, else a new one; an old one
        stays with the sessions holding it and ends with them."""
        wanted = (config.smtp.spf, config.dns, config.node.hostname)
        if wanted == self._made_for:
            return self.spf
        if self._made_for is not None and self._made_for[1] != config.dns:
            self.cache.flush()  # other name servers may answer otherwise
        self._made_for = wanted
        self.spf = SpfCheck(nameservers=config.dns.nameserver_addresses,
                            timeout=config.dns.timeout, cache=self.cache,
                            receiver=config.node.hostname) if config.smtp.spf else None
        return self.spf

    def close(self) -> None:
        if self.spf is not None:
            self.spf.close()


def _next_hops(config: Config) -> dict[str, str]:
    return {name: d.next_hop for name, d in config.domains.items() if d.next_hop}


def _server_tls(config: Config) -> ssl.SSLContext | None:
    """The STARTTLS context from the files as they are now, or the config problem."""
    try:
        return tls_context(config)
    except OSError as exc:  # ssl.SSLError included: a key that does not match, a bad PEM
        reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else cause(exc)
        problem = (f"{config.source}: smtp.tls_cert: cannot load {config.smtp.tls_cert} "
                   f"with {config.smtp.tls_key}: {reason}")
        raise ConfigError([problem]) from None


def _delivery_tls(config: Config) -> ssl.SSLContext:
    """The context `delivery.tls = "verify"` checks certificates with, or the config problem."""
    try:
        return verifying_tls_context(config.delivery.tls_ca_file)
    except OSError as exc:  # ssl.SSLError included: not a PEM of certificates
        reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else cause(exc)
        problem = (f"{config.source}: delivery.tls_ca_file: cannot load "
                   f"{config.delivery.tls_ca_file}: {reason}")
        raise ConfigError([problem]) from None


def _policies(known: KnownRecipients, metrics: Metrics, clock: Clock,
              callouts: Callouts) -> Callable[[Config], Policy]:
    """How a config becomes the accept side's policy, at start and on reload:
    with the known recipients it consults, the callouts it may ask, and the
    metric it counts in."""

    def build(config: Config) -> Policy:
        return Policy(config, known=known, checked=metrics.recipient_checked, now=clock.now,
                      callouts=callouts)

    return build


def _configure_callouts(callouts: Callouts, config: Config, resolver: DnsResolver,
                        verify: ssl.SSLContext, policy: Policy) -> None:
    """Callouts follow delivery's routing, TLS policy and backoff."""
    client = callouts.prober
    assert isinstance(client, CalloutClient)
    client.tls, client.verify_context = config.delivery.tls, verify
    callouts.resolver = resolver
    callouts.next_hops = _next_hops(config)
    callouts.backoff = rules_from_config(config).backoff
    callouts.active = policy.calls_out


def _prepare_reload(
    listeners: Listeners, scheduler: Scheduler, transport: SmtpTransport,
    reloader: Reloader, log_level: str | None, poll_interval: float | None,
    policies: Callable[[Config], Policy], known: KnownRecipients,
    heartbeat: Heartbeat, peers: _Peers, callouts: Callouts, dns: _Dns,
) -> Callable[[Config], Callable[[], None]]:
    """What SIGHUP changes, built in a worker thread (where a bad certificate is
    found before anything changed); the step returned swaps it in on the loop."""

    def prepare(new: Config) -> Callable[[], None]:
        tls = _server_tls(new)
        verify = _delivery_tls(new)
        policy = policies(new)
        rules = rules_from_config(new)
        resolver = _resolver(new, dns)
        resolver.see_peers(*peers.seen)

        def commit() -> None:
            old = reloader.config
            listeners.reconfigure(new, policy, tls, dns.spf_for(new))
            known.active = policy.verifies
            _configure_callouts(callouts, new, resolver, verify, policy)
            scheduler.reconfigure(rules=rules, limits=_limits(new, poll_interval),
                                  next_hops=_next_hops(new), resolver=resolver)
            peers.resolver = resolver
            heartbeat.lease, heartbeat.retention = new.queue.lease, new.queue.log_retention
            transport.tls = new.delivery.tls
            transport.verify_context = verify
            transport.connect_timeout = new.delivery.connect_timeout
            transport.command_timeout = new.delivery.command_timeout
            transport.data_timeout = new.delivery.data_timeout
            if new.log != old.log:  # `serve --log-level` wins over the file, as at start
                maillog.setup(log_level or new.log.level, json_lines=new.log.format == "json")

        return commit

    return prepare


class _Peers:
    """The nodes our heartbeat last heard of, for whichever resolver is current."""

    def __init__(self, resolver: DnsResolver) -> None:
        self.resolver = resolver
        self.seen: tuple[set[str], set[str]] = (set(), set())

    def __call__(self, hostnames: set[str], addresses: set[str]) -> None:
        self.seen = (hostnames, addresses)
        self.resolver.see_peers(hostnames, addresses)


def _queue_files(config: Config, *, created_directory: bool) -> list[str]:
    """What `node.user` must own to keep the SQLite queue working: the database,
    its -wal and -shm, the wake-up socket, and the directory when we made it
    (SQLite creates and deletes -wal and -shm in it). None for PostgreSQL."""
    database = config.queue.sqlite_path
    if database is None:
        return []
    files = [str(database), f"{database}-wal", f"{database}-shm"]
    wake = notify.sqlite_address(str(database))
    if wake is not None and not wake.startswith("\0"):  # abstract sockets are no file
        files.append(wake)
    if created_directory:
        files.append(str(database.parent))
    return files


def _destination_back(engine: Engine, name: str) -> None:
    """Our probe found `name` answering and unparked its mail: wake every node
    sharing the queue, so all of them drain it now (SQLite has one node)."""
    log.info("destination %s answers again: its mail is due on every node", name)
    if engine.dialect.name != "sqlite":
        asyncio.get_running_loop().run_in_executor(None, notify.notify, engine)


def _stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The first SIGTERM or SIGINT stops gracefully; another one while that
    goes on (a second Ctrl-C, a hung database) stops at once, as kill -9
    would: nothing acknowledged is lost (README "What is fsync'd")."""

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
            return
        log.warning("stopping now, on a second %s: messages not yet answered 250 are "
                    "dropped (their clients send them again); deliveries under way are "
                    "tried again after the restart", sig.name)
        logging.shutdown()  # flush the log: os._exit skips it
        os._exit(EXIT_STOPPED_NOW)

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, on_signal, sig)


async def serve(
    config: Config,
    *,
    config_path: str | None = None,
    log_level: str | None = None,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
    poll_interval: float | None = None,
    known_refresh: float = REFRESH_INTERVAL,
) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT arrive).

    `config_path`: the file `config` came from, re-read (with the same
    environment overrides) on SIGHUP; `log_level`: `serve --log-level`, which
    a reload keeps. `poll_interval`: how often the scheduler looks for due work unasked
    (default: `Limits`'); wake-ups from other processes come at once anyway.
    `known_refresh`: how often learned recipients are re-read from the queue.
    """
    clock = clock or SystemClock()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    _stop_on_signals(loop, stop)
    reloader = Reloader(config, functools.partial(configuration.load, config_path)
                        if config_path else None)
    with contextlib.suppress(RuntimeError, ValueError):  # not the main thread
        loop.add_signal_handler(signal.SIGHUP, reloader.request)

    database = config.queue.sqlite_path
    created = database is not None and not database.parent.exists()
    engine = db.connect(config.queue.url, background_checkpoints=True,
                        lock_timeout=config.queue.lock_timeout)
    revision = await asyncio.to_thread(db.ensure_ready, engine)
    log.info("queue database at schema revision %s", revision.current)
    store = Store(Queue(engine), gathering=Gathering(config.queue.commit_delay))
    shared = engine.dialect.name == "postgresql"  # other nodes may scrape alongside this one
    metrics = Metrics(store.queue, clock, nodes=store.queue,
                      node=config.node.hostname if shared else None)
    known = KnownRecipients()
    dns = _Dns()
    resolver = _resolver(config, dns)
    delivery_tls = _delivery_tls(config)

    async def learn(learned: Sequence[Learned], at: datetime) -> int:
        return await store.call(store.queue.learn_recipients, learned, at)

    callouts = Callouts(
        prober=CalloutClient(helo_name=config.node.hostname, tls=config.delivery.tls,
                             verify_context=delivery_tls),
        resolver=resolver, clock=clock, backoff=rules_from_config(config).backoff,
        known=known, learn=learn, counted=metrics.callout,
    )
    policies = _policies(known, metrics, clock, callouts)
    policy = policies(config)
    known.active = policy.verifies
    _configure_callouts(callouts, config, resolver, delivery_tls, policy)

    async def read_known(since: datetime | None) -> tuple[list[KnownRecipient], int]:
        return await store.read(store.queue.known_changes, since)

    if known.active:  # what was learned before a restart applies from the first RCPT
        await known.refresh(read_known)
    rules = rules_from_config(config)
    transport = SmtpTransport(
        helo_name=config.node.hostname,
        tls=config.delivery.tls,
        connect_timeout=config.delivery.connect_timeout,
        command_timeout=config.delivery.command_timeout,
        data_timeout=config.delivery.data_timeout,
        verify_context=delivery_tls,
    )
    node = this_node(config.node.hostname, tuple(sorted(identity(config).addresses)),
                     clock.now())
    peers = _Peers(resolver)
    heartbeat = Heartbeat(store, clock, node, lease=config.queue.lease,
                          retention=config.queue.log_retention, on_peers=peers)
    returned = await heartbeat.start()
    if returned:
        log.info("returned %d deliveries of an earlier run of this node to the queue", returned)
    scheduler = Scheduler(
        store=store,
        resolver=resolver,
        transport=transport,
        rules=rules,
        limits=_limits(config, poll_interval),
        clock=clock,
        owner=node.id,
        next_hops=_next_hops(config),
        metrics=metrics,
        learned=known.taught,
        on_destination_back=functools.partial(_destination_back, engine),
    )

    def submit(message: NewMessage) -> asyncio.Future[None]:
        stored = store.put(message)

        def queued(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                scheduler.mail_queued({domain_of(r) for r in message.recipients})

        stored.add_done_callback(queued)
        return stored

    async def etrn(domain: str) -> int:
        """ETRN wakes our scheduler, then the other nodes sharing the queue."""
        count = await scheduler.flush_domain(domain)
        if count and engine.dialect.name != "sqlite":  # SQLite has one node: this one
            await asyncio.to_thread(notify.notify, engine)
        return count

    listeners = await start_listeners(
        config,
        submit,
        id_factory=new_queue_id,
        clock=clock,
        on_etrn=etrn,
        policy=policy,
        metrics=metrics,
        spf=dns.spf_for(config),
        gathering=store.gathering,
    )
    http = None
    if config.metrics.address is not None:
        health = HealthCheck(listening=lambda: not stop.is_set(), ping=store.queue.ping,
                             room=listeners.free_space.problem, writes=store.write_problem)
        try:
            http = await start_http(config.metrics.address, metrics.registry, health)
        except OSError as exc:
            listeners.close()
            await listeners.wait_closed()
            raise ListenError("metrics", str(config.metrics.address), exc) from exc
    wakeups = notify.listener(engine, scheduler.wake)  # a flush by `relay queue` wakes us
    wakeups.start(asyncio.get_running_loop())
    if config.node.user:  # everything root was needed for is open now
        privileges.drop(config.node.user, _queue_files(config, created_directory=created))
    scheduler_task = asyncio.create_task(scheduler.run(), name="scheduler")
    known_task = asyncio.create_task(known.run(read_known, known_refresh), name="known-recipients")

    async def read_down() -> list[str]:
        return list(await store.read(store.queue.down_destinations))

    callouts_task = asyncio.create_task(callouts.run(read_down, known_refresh), name="callouts")
    heartbeat_task = asyncio.create_task(heartbeat.run(), name="heartbeat")
    log.info(
        "mx-relay ready: smtp on %s, queue %s, node %s",
        ", ".join(str(a) for a in config.smtp.listen),
        config.queue.location, node.id,
    )
    reloader.attach(_prepare_reload(listeners, scheduler, transport, reloader, log_level,
                                    poll_interval, policies, known, heartbeat, peers,
                                    callouts, dns))
    if on_ready:
        on_ready()
    try:
        await stop.wait()
    finally:
        log.info("stopping: no new connections; finishing deliveries")
        with contextlib.suppress(RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
        listeners.close()
        grace = reloader.config.smtp.shutdown_grace
        if not await listeners.wait_sessions(grace):
            log.warning("stopping: messages still arriving after %g s are dropped; "
                        "their clients will send them again", grace)
            listeners.stop_receiving()
        await listeners.wait_closed()
        await callouts.close()
        await scheduler.stop(SHUTDOWN_GRACE)
        scheduler_task.cancel()
        known_task.cancel()
        callouts_task.cancel()
        await asyncio.gather(scheduler_task, known_task, callouts_task, return_exceptions=True)
        await heartbeat.stop()
        await asyncio.gather(heartbeat_task, return_exceptions=True)
        await transport.close()
        dns.close()
        wakeups.close()
        if http is not None:
            http.close()
            await http.wait_closed()
        await asyncio.to_thread(store.close)
        engine.dispose()
        log.info("stopped")
