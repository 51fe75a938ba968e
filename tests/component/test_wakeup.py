"""`relay queue flush` wakes a running relay at once: `relay serve` in this process
with a poll interval of an hour, the CLI as a real subprocess, a real DNS server
and primary MX on loopback, on SQLite and on PostgreSQL. Only the wake-up
(relay/cluster/notify.py) can explain a delivery within seconds."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay import service
from relay.core import config as configuration
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


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=needs_postgres)])
async def test_a_flush_from_the_cli_reaches_a_relay_that_polls_hourly(
    backend: str, tmp_path: Path, dns_server: DnsServer, smtp_sink: Callable[..., Sink],
    request: pytest.FixtureRequest,
) -> None:
    add_zone(dns_server)
    mx_port, relay_port = free_port(PRIMARY, NORWICH, SENDER_MX), free_port(RELAY)
    settings = base_config(tmp_path, relay_port, mx_port, dns_server.address)
    if backend == "postgresql":
        settings["queue"]["url"] = request.getfixturevalue("postgres_db_url")
    settings["delivery"].update(min_backoff="1h", max_backoff="1h")
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(settings))
    cfg = configuration.load(str(path))
    primary = smtp_sink(PRIMARY, mx_port, refuse_sessions=True)  # 421: deferred for an hour

    deferred = MailEvents("deferred")
    mail_log = logging.getLogger("relay.mail")
    mail_log.addHandler(deferred)
    level = mail_log.level
    mail_log.setLevel(logging.INFO)
    stop, ready = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(
        service.serve(cfg, stop=stop, on_ready=ready.set, poll_interval=HOUR))
    try:
        await asyncio.wait_for(ready.wait(), DEADLINE)
        await asyncio.to_thread(send, relay_port)
        await asyncio.wait_for(deferred.seen.wait(), DEADLINE)
        primary.refuse_sessions = False

        started = time.monotonic()
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "-c", str(path), "queue", "flush", "--all",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(cli.communicate(), DEADLINE * 3)
        assert cli.returncode == 0, err
        assert out == b"1 message flushed\n"
        [delivered] = await primary.await_messages(1, timeout=DEADLINE)
        assert delivered.recipients == ("alice@verrotech.com",)
        assert time.monotonic() - started < DEADLINE < HOUR
    finally:
        stop.set()
        await asyncio.wait_for(serving, 60)
        mail_log.removeHandler(deferred)
        mail_log.setLevel(level)

