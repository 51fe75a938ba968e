"""Delivery uncertain end to end: `relay serve` in this process, a real DNS
server and a primary MX on loopback that cuts the connection, or falls silent,
right after the final dot of DATA. The relay must record the recipient as
uncertain (queue show, mail log, metric) and deliver on the retry, which here
an operator's `queue flush` starts (the poll interval is an hour, so nothing
else can)."""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import sys
import urllib.request
from pathlib import Path
from typing import Any

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
    to_toml,
)
from tests.support.deployment import message as mail
from tests.support.dns_server import DnsServer
from tests.support.relay_process import free_port
from tests.support.smtp_sink import Sink

HOUR = 3600.0
DEADLINE = 20.0
ALICE = "alice@verrotech.com"


class MailEvents(logging.Handler):
    """Keeps the mail log's events; `wait` returns the first `event` line's fields."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Condition()
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "mail_event", None)
        if fields is not None:
            self.loop.call_soon_threadsafe(self._add, dict(fields))

    def _add(self, fields: dict[str, Any]) -> None:
        self.events.append(fields)
        self.loop.create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait(self, event: str) -> dict[str, Any]:
        def found() -> list[dict[str, Any]]:
            return [e for e in self.events if e.get("event") == event]

        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(found), DEADLINE)
        return found()[0]


async def cli(path: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "-c", str(path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE * 3)
    assert proc.returncode == 0, err
    return out.decode()


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


def send(port: int) -> None:
    with smtplib.SMTP(RELAY, port, timeout=10) as client:
        client.sendmail("a@sender.example", [ALICE], mail(1))


@pytest.mark.parametrize("mode", ["cut", "stall"])
async def test_an_uncertain_delivery_is_shown_logged_counted_and_retried(
    mode: str, tmp_path: Path, dns_server: DnsServer, smtp_sink: Any,
) -> None:
    add_zone(dns_server)
    mx_port, port = free_port(PRIMARY, NORWICH, SENDER_MX), free_port(RELAY)
    metrics = f"{RELAY}:{free_port(RELAY)}"
    settings = base_config(tmp_path, port, mx_port, dns_server.address)
    settings["delivery"].update(min_backoff="1h", max_backoff="1h", data_timeout="500ms")
    settings["metrics"]["listen"] = metrics
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(settings))
    primary: Sink = smtp_sink(PRIMARY, mx_port)
    if mode == "cut":
        primary.disconnect_on = "DATA"  # closes after reading the final dot, no reply
    else:
        primary.stall_on = "DATA"  # reads the final dot, never answers

    events = MailEvents()
    mail_log = logging.getLogger("relay.mail")
    mail_log.addHandler(events)
    level = mail_log.level
    mail_log.setLevel(logging.INFO)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(service.serve(
        configuration.load(str(path)), stop=stop, on_ready=ready.set, poll_interval=HOUR))
    try:
        await asyncio.wait_for(ready.wait(), DEADLINE)
        await asyncio.to_thread(send, port)

        logged = await events.wait("uncertain")
        queue_id = logged["id"]
        assert logged["to"] == f"<{ALICE}>"
        assert logged["reply"].startswith("delivery uncertain: 451 4.4.2 ")
        assert ("lost connection" if mode == "cut" else "timed out") in logged["reply"]
        assert "next_attempt" in logged

        shown = json.loads(await cli(path, "queue", "show", queue_id, "--json"))
        [rcpt] = shown["recipients"]
        assert rcpt["uncertain"] is True
        assert rcpt["status"] == "deferred"
        assert rcpt["last_reply"] == logged["reply"]
        text = await cli(path, "queue", "show", queue_id)
        assert "delivery uncertain: " in text

        body = await asyncio.to_thread(scrape, metrics)
        assert 'relay_delivery_attempts_total{result="uncertain"} 1.0' in body
        assert 'relay_delivery_attempts_total{result="deferred"} 0.0' in body

        primary.disconnect_on = primary.stall_on = None
        await cli(path, "queue", "flush", "--all")
        [got] = await primary.await_messages(1, timeout=DEADLINE)
        assert got.recipients == (ALICE,)
        delivered = await events.wait("delivered")
        assert delivered["id"] == queue_id
        assert await cli(path, "queue", "list", "--json") in ("[]\n", "")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        mail_log.removeHandler(events)
        mail_log.setLevel(level)
