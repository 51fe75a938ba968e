"""`relay serve`: wires listener, scheduler and store together, and handles signals.

Owns process lifetime: migrate or refuse the database, start the SMTP
listeners and the scheduler, stop on SIGTERM/SIGINT by closing the listeners
first, letting in-flight deliveries finish (or putting them back), flushing
the last commits and exiting 0; a second signal during all that stops at
once (exit 1). Refuses business logic: each part lives in its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from relay.core.clock import Clock, SystemClock
from relay.core.config import Config
from relay.delivery.outcomes import rules_from_config
from relay.delivery.resolver import DnsResolver, Identity
from relay.delivery.scheduler import Limits, Scheduler
from relay.delivery.transport import SmtpTransport
from relay.ops.http import HealthCheck, start_http
from relay.ops.metrics import Metrics
from relay.queue import db
from relay.queue.access import NewMessage, Queue, domain_of, new_queue_id
from relay.queue.store import Store
from relay.smtp.listeners import start_listeners

log = logging.getLogger("relay.service")

SHUTDOWN_GRACE = 20.0  # seconds in-flight deliveries get to finish on SIGTERM
EXIT_STOPPED_NOW = 1  # the exit status after a second signal cut the graceful stop short


def identity(config: Config) -> Identity:
    """Who we are for MX loop avoidance: our name, listen IPs and node.addresses."""
    addresses = {a.host for a in config.smtp.listen if a.host not in ("0.0.0.0", "::")}
    addresses.update(config.node.addresses)
    return Identity(hostname=config.node.hostname, addresses=frozenset(addresses))


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
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT arrive)."""
    clock = clock or SystemClock()
    stop = stop or asyncio.Event()
    _stop_on_signals(asyncio.get_running_loop(), stop)

    engine = db.connect(config.queue.url, background_checkpoints=True)
    revision = await asyncio.to_thread(db.ensure_ready, engine)
    log.info("queue database at schema revision %s", revision.current)
    store = Store(Queue(engine))
    metrics = Metrics(store.queue, clock)
    rules = rules_from_config(config)
    transport = SmtpTransport(
        helo_name=config.node.hostname,
        tls=config.delivery.tls,
        connect_timeout=config.delivery.connect_timeout,
    )
    scheduler = Scheduler(
        store=store,
        resolver=DnsResolver(
            nameservers=config.dns.nameserver_addresses,
            timeout=config.dns.timeout,
            identity=identity(config),
            port=config.delivery.port,
        ),
        transport=transport,
        rules=rules,
        limits=Limits(
            concurrency=config.delivery.concurrency,
            per_destination=config.delivery.per_destination_concurrency,
            log_retention=config.queue.log_retention,
        ),
        clock=clock,
        owner=config.node.hostname,
        next_hops={name: d.next_hop for name, d in config.domains.items() if d.next_hop},
        metrics=metrics,
    )

    def submit(message: NewMessage) -> asyncio.Future[None]:
        stored = store.put(message)

        def queued(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                scheduler.mail_queued({domain_of(r) for r in message.recipients})

        stored.add_done_callback(queued)
        return stored

    listeners = await start_listeners(
        config,
        submit,
        id_factory=new_queue_id,
        clock=clock,
        on_etrn=scheduler.flush_domain,
        metrics=metrics,
    )
    http = None
    if config.metrics.address is not None:
        health = HealthCheck(listening=lambda: not stop.is_set(), ping=store.queue.ping)
        http = await start_http(config.metrics.address, metrics.registry, health)
    scheduler_task = asyncio.create_task(scheduler.run(), name="scheduler")
    log.info(
        "mx-relay ready: smtp on %s, queue %s",
        ", ".join(str(a) for a in config.smtp.listen),
        config.queue.location,
    )
    if on_ready:
        on_ready()
    try:
        await stop.wait()
    finally:
        log.info("stopping: no new connections; finishing deliveries")
        listeners.close()
        if not await listeners.wait_sessions(config.smtp.shutdown_grace):
            log.warning("stopping: messages still arriving after %g s are dropped; "
                        "their clients will send them again", config.smtp.shutdown_grace)
            listeners.stop_receiving()
        await listeners.wait_closed()
        await scheduler.stop(SHUTDOWN_GRACE)
        scheduler_task.cancel()
        await asyncio.gather(scheduler_task, return_exceptions=True)
        await transport.close()
        if http is not None:
            http.close()
            await http.wait_closed()
        await asyncio.to_thread(store.close)
        engine.dispose()
        log.info("stopped")
