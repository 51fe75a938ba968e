"""`relay queue flush` wakes a running relay at once: `relay serve` in this process
with a poll interval of an hour, the CLI as a real subprocess, a real DNS server
and primary MX on loopback, on SQLite and on PostgreSQL. Only the wake-up
(relay/cluster/notify.py) can explain a delivery within seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import smtplib
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relay import service
from relay.cluster import notify
from relay.core import config as configuration
from relay.queue import db
from tests.support.deployment import (
    NORWICH,
    PRIMARY,
    RELAY,
    SENDER_MX,
    add_zone,
    base_config,
    message,
    to_toml,
)
from tests.support.dns_server import DnsServer
from tests.support.postgres import needs_postgres
from tests.support.relay_process import free_port
from tests.support.smtp_sink import Sink

HOUR = 3600.0
DEADLINE = 10.0  # seconds; a wake-up takes milliseconds, the poll would take an hour


class MailEvents(logging.Handler):
    """Sets an event when the mail log reports `event` (logged after the commit)."""

    def __init__(self, event: str) -> None:
        super().__init__()
        self.wanted = event
        self.seen = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "mail_event", {})
        if fields.get("event") == self.wanted:
            self.loop.call_soon_threadsafe(self.seen.set)


def send(port: int) -> None:
    with smtplib.SMTP(RELAY, port, timeout=10) as client:
        client.sendmail("a@sender.example", ["alice@verrotech.com"], message(1))


class Hourly:
    """`relay serve` in this process, polling hourly, its primary answering 421."""

    def __init__(self, tmp_path: Path, dns_server: DnsServer, smtp_sink: Callable[..., Sink],
                 url: str | None, **smtp: object) -> None:
        add_zone(dns_server)
        mx_port, self.port = free_port(PRIMARY, NORWICH, SENDER_MX), free_port(RELAY)
        settings = base_config(tmp_path, self.port, mx_port, dns_server.address)
        if url is not None:
            settings["queue"]["url"] = url
        settings["delivery"].update(min_backoff="1h", max_backoff="1h")
        settings["smtp"].update(smtp)
        self.path = tmp_path / "relay.toml"
        self.path.write_text(to_toml(settings))
        self.config = configuration.load(str(self.path))
        self.primary = smtp_sink(PRIMARY, mx_port, refuse_sessions=True)
        self.stop = asyncio.Event()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Serve with one message deferred by the primary's 421; then the primary is up."""
        deferred = MailEvents("deferred")
        mail_log = logging.getLogger("relay.mail")
        mail_log.addHandler(deferred)
        level = mail_log.level
        mail_log.setLevel(logging.INFO)
        ready = asyncio.Event()
        task = asyncio.create_task(service.serve(
            self.config, stop=self.stop, on_ready=ready.set, poll_interval=HOUR))
        try:
            await asyncio.wait_for(ready.wait(), DEADLINE)
            await asyncio.to_thread(send, self.port)
            await asyncio.wait_for(deferred.seen.wait(), DEADLINE)
            self.primary.refuse_sessions = False
            yield
        finally:
            self.stop.set()
            await asyncio.wait_for(task, 60)
            mail_log.removeHandler(deferred)
            mail_log.setLevel(level)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=needs_postgres)])
async def test_a_flush_from_the_cli_reaches_a_relay_that_polls_hourly(
    backend: str, tmp_path: Path, dns_server: DnsServer, smtp_sink: Callable[..., Sink],
    request: pytest.FixtureRequest,
) -> None:
    url = request.getfixturevalue("postgres_db_url") if backend == "postgresql" else None
    relay = Hourly(tmp_path, dns_server, smtp_sink, url)
    async with relay.serving():
        started = time.monotonic()
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "-c", str(relay.path), "queue", "flush", "--all",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(cli.communicate(), DEADLINE * 3)
        assert cli.returncode == 0, err
        assert out == b"1 message flushed\n"
        [delivered] = await relay.primary.await_messages(1, timeout=DEADLINE)
        assert delivered.recipients == ("alice@verrotech.com",)
        assert time.monotonic() - started < DEADLINE < HOUR


@needs_postgres
async def test_etrn_on_one_node_wakes_the_other_nodes(
    tmp_path: Path, dns_server: DnsServer, smtp_sink: Callable[..., Sink], postgres_db_url: str,
) -> None:
    relay = Hourly(tmp_path, dns_server, smtp_sink, postgres_db_url,
                   etrn_clients=["127.0.0.0/8"])
    other_node = asyncio.Event()
    async with relay.serving():
        engine = db.connect(postgres_db_url)
        ear = notify.listener(engine, other_node.set)
        ear.start(asyncio.get_running_loop())
        try:
            assert isinstance(ear, notify.PostgresListener)
            assert await asyncio.to_thread(ear.listening.wait, DEADLINE)
            code, _ = await asyncio.to_thread(etrn, relay.port, "verrotech.com")
            assert code == 250
            await asyncio.wait_for(other_node.wait(), DEADLINE)
            await relay.primary.await_messages(1, timeout=DEADLINE)  # and this node's own
        finally:
            ear.close()
            engine.dispose()


def etrn(port: int, domain: str) -> tuple[int, bytes]:
    with smtplib.SMTP(RELAY, port, timeout=10) as client:
        client.ehlo("client.sender.example")
        return client.docmd("ETRN", domain)
