"""SIGHUP to `relay serve` running in this process: a real signal, real SMTP
sessions on loopback, a real SQLite queue and a real next hop. What a reload
swaps in (policy, limits, TLS certificate, delivery rules) reaches new sessions
and next attempts; a session open across it keeps what it started with; what
needs a restart and what does not validate leave the running relay as it was."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay import service
from relay.core import config as configuration
from tests.support.deployment import merge, to_toml
from tests.support.log_lines import LogLines, capturing
from tests.support.relay_process import free_port
from tests.support.smtp_lines import LineClient, Reply
from tests.support.smtp_sink import Sink, closed_port, sink_ca

HOST = "mx.example"
DEADLINE = 10.0
BODY = b"Subject: reload\r\n\r\nHello.\r\n.\r\n"


class ReloadLog(LogLines):
    """`relay.service`'s lines; `done` counts reloads, applied or refused."""

    @property
    def done(self) -> int:
        return sum(1 for text in self.lines if text.startswith("reloaded ")
                   or (text.startswith("reload of ") and "refused" in text))

    async def wait_reloads(self, count: int) -> None:
        await self.wait(lambda: self.done >= count)


class Client(LineClient[tuple[int, list[str]]]):
    """One SMTP session, a command at a time; replies as code and texts."""

    deadline = DEADLINE

    def shaped(self, reply: Reply) -> tuple[int, list[str]]:
        return reply.code, reply.lines

    async def starttls(self, context: ssl.SSLContext) -> None:
        assert (await self.cmd("STARTTLS"))[0] == 220
        await self.writer.start_tls(context, server_hostname=HOST)


class Served:
    """`relay serve` in this process on a config file the test rewrites."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.port = free_port("127.0.0.1")
        self.path = tmp_path / "relay.toml"
        self.settings: dict[str, Any] = merge({
            "node": {"hostname": HOST},
            "smtp": {"listen": [f"127.0.0.1:{self.port}"], "spf": False},  # no DNS here
            "queue": {"url": f"sqlite:///{tmp_path}/queue.db"},
            "delivery": {"min_backoff": "1s", "max_backoff": "1s", "connect_timeout": "2s"},
            "dns": {"nameservers": ["127.0.0.1:1"], "timeout": "1s"},
            "metrics": {"listen": ""},
            "domains": {"old.example": {}},
        }, overrides)
        self.path.write_text(to_toml(self.settings))
        self.stop = asyncio.Event()

    def rewrite(self, **overrides: Any) -> None:
        self.settings = merge(self.settings, overrides)
        self.path.write_text(to_toml(self.settings))


@pytest.fixture
async def reloads() -> AsyncIterator[ReloadLog]:
    async with capturing(ReloadLog(logging.INFO, DEADLINE), "relay.service",
                         logging.INFO) as handler:
        yield handler


@pytest.fixture
async def serving() -> AsyncIterator[Callable[[Served], Any]]:
    """Start a `Served` relay; stopped at teardown."""
    tasks: list[tuple[Served, asyncio.Task[None]]] = []

    async def start(served: Served) -> Served:
        ready = asyncio.Event()
        config = configuration.load(str(served.path))
        task = asyncio.create_task(service.serve(
            config, config_path=str(served.path), stop=served.stop, on_ready=ready.set,
            poll_interval=0.2))
        tasks.append((served, task))
        await asyncio.wait_for(ready.wait(), DEADLINE)
        return served

    yield start
    for served, task in tasks:
        served.stop.set()
        await asyncio.wait_for(task, 60)


def hangup() -> None:
    """A real SIGHUP to this process, once `relay serve` handles it (never the
    default action, which would end the test run)."""
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    os.kill(os.getpid(), signal.SIGHUP)


async def test_a_session_open_across_a_reload_keeps_working_and_new_ones_take_the_new_domain(
    tmp_path: Path, serving: Callable[[Served], Any], reloads: ReloadLog,
) -> None:
    relay = await serving(Served(tmp_path, smtp={"max_message_size": "10MB"}))
    before = await Client.greeted(relay.port)
    assert "SIZE 10000000" in (await before.cmd("EHLO client.example"))[1]
    assert (await before.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await before.cmd("RCPT TO:<alice@old.example>"))[0] == 250

    relay.rewrite(domains={"new.example": {}}, smtp={"max_message_size": "5MB"})
    hangup()
    await reloads.wait_reloads(1)
    assert any(line.startswith(f"reloaded {relay.path}: changed smtp, domains")
               for line in reloads.lines), reloads.lines

    # the open session goes on as it began: its domains, its size
    assert (await before.cmd("RCPT TO:<bob@new.example>"))[0] == 554
    assert (await before.cmd("DATA"))[0] == 354
    before.writer.write(BODY)
    code, lines = await before.reply()
    assert code == 250 and "queued as" in lines[0]
    assert "SIZE 10000000" in (await before.cmd("EHLO client.example"))[1]
    await before.close()

    after = await Client.greeted(relay.port)
    assert "SIZE 5000000" in (await after.cmd("EHLO client.example"))[1]
    assert (await after.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await after.cmd("RCPT TO:<bob@new.example>"))[0] == 250
    assert (await after.cmd("RCPT TO:<alice@old.example>"))[0] == 250
    await after.close()


async def test_a_config_that_does_not_validate_is_refused_and_the_old_one_stays(
    tmp_path: Path, serving: Callable[[Served], Any], reloads: ReloadLog,
) -> None:
    relay = await serving(Served(tmp_path))
    relay.path.write_text(relay.path.read_text()
                          + '\n[domains."new.example"]\nrecipients_file = "missing.txt"\n'
                          + "[log]\nlevel = \"loud\"\n")
    hangup()
    await reloads.wait_reloads(1)
    assert f"reload refused: {relay.path}: log.level: Input should be 'debug', 'info', " \
           "'warning' or 'error'" in reloads.lines
    assert f"reload of {relay.path} refused (1 problem): the config in force stays" \
        in reloads.lines

    client = await Client.greeted(relay.port)  # still running, on the old domains
    await client.cmd("EHLO client.example")
    assert (await client.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await client.cmd("RCPT TO:<alice@old.example>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@new.example>"))[0] == 554
    await client.close()

    relay.path.write_text(relay.path.read_text().replace('"loud"', '"info"'))
    hangup()
    await reloads.wait_reloads(2)
    assert f"reload refused: {relay.path}: domains.new.example.recipients_file: " \
           f"file not found: missing.txt (resolved to {relay.path.parent}/missing.txt)" \
           in reloads.lines


async def test_a_changed_listen_address_needs_a_restart_and_the_rest_applies(
    tmp_path: Path, serving: Callable[[Served], Any], reloads: ReloadLog,
) -> None:
    relay = await serving(Served(tmp_path))
    moved = free_port("127.0.0.1")
    relay.rewrite(smtp={"listen": [f"127.0.0.1:{moved}"]}, node={"hostname": "other.example"},
                  domains={"new.example": {}})
    hangup()
    await reloads.wait_reloads(1)
    assert (f"reload: smtp.listen, node.hostname: changed in {relay.path}, needs a restart; "
            "running on with the values it started with") in reloads.lines
    client = await Client.greeted(relay.port)  # the old address, the old name
    assert (await client.cmd("EHLO client.example"))[1][0] == HOST
    assert (await client.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@new.example>"))[0] == 250
    await client.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", moved)


def write_cert(ca: trustme.CA, path: Path) -> None:
    ca.issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(str(path))


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_a_reload_reads_a_renewed_certificate_and_refuses_a_broken_one(
    tmp_path: Path, serving: Callable[[Served], Any], reloads: ReloadLog,
) -> None:
    first, renewed = trustme.CA(), trustme.CA()
    write_cert(first, tmp_path / "cert.pem")
    relay = await serving(Served(tmp_path, smtp={"tls_cert": "cert.pem",
                                                 "tls_key": "cert.pem"}))
    write_cert(renewed, tmp_path / "cert.pem")
    hangup()
    await reloads.wait_reloads(1)
    client = await Client.greeted(relay.port)
    await client.cmd("EHLO client.example")
    await client.starttls(trusting(renewed))  # verifies only against the renewed CA
    assert (await client.cmd("EHLO client.example"))[0] == 250
    await client.close()

    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n")
    hangup()
    await reloads.wait_reloads(2)
    assert any(line.startswith(f"reload refused: {relay.path}: smtp.tls_cert: cannot load ")
               for line in reloads.lines), reloads.lines
    client = await Client.greeted(relay.port)  # the renewed certificate stays in use
    await client.cmd("EHLO client.example")
    await client.starttls(trusting(renewed))
    await client.close()


async def test_next_attempts_follow_a_reloaded_next_hop(
    tmp_path: Path, serving: Callable[[Served], Any], reloads: ReloadLog,
    smtp_sink: Callable[..., Sink],
) -> None:
    sink = smtp_sink("127.0.0.1")
    relay = await serving(Served(tmp_path, domains={
        "old.example": {"next_hop": f"127.0.0.1:{closed_port()}"}}))
    client = await Client.greeted(relay.port)
    await client.cmd("EHLO client.example")
    await client.cmd("MAIL FROM:<a@sender.example>")
    await client.cmd("RCPT TO:<alice@old.example>")
    await client.cmd("DATA")
    client.writer.write(BODY)
    assert (await client.reply())[0] == 250
    await client.close()

    relay.rewrite(domains={"old.example": {"next_hop": f"127.0.0.1:{sink.port}"}})
    hangup()
    await reloads.wait_reloads(1)
    [message] = await sink.await_messages(1, timeout=DEADLINE)
    assert message.recipients == ("alice@old.example",)


class Deferrals(logging.Handler):
    """Sets `seen` once the mail log reports a deferral."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.loop = asyncio.get_running_loop()
        self.seen = asyncio.Event()
        self.replies: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "mail_event", {})
        if fields.get("event") == "deferred":
            self.replies.append(fields["reply"])
            self.loop.call_soon_threadsafe(self.seen.set)


async def test_a_reloaded_ca_file_is_what_verify_trusts_next(
    tmp_path: Path, serving: Callable[[Served], Any], reloads: ReloadLog,
    smtp_sink: Callable[..., Sink],
) -> None:
    sink = smtp_sink("127.0.0.1", tls=True)  # its certificate names 127.0.0.1
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))  # not the sink's CA
    deferrals = Deferrals()
    mail_log = logging.getLogger("relay.mail")
    mail_log.addHandler(deferrals)
    level = mail_log.level
    mail_log.setLevel(logging.INFO)
    try:
        relay = await serving(Served(
            tmp_path, delivery={"tls": "verify", "tls_ca_file": "ca.pem"},
            domains={"old.example": {"next_hop": f"127.0.0.1:{sink.port}"}}))
        client = await Client.greeted(relay.port)
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<a@sender.example>")
        await client.cmd("RCPT TO:<alice@old.example>")
        await client.cmd("DATA")
        client.writer.write(BODY)
        assert (await client.reply())[0] == 250
        await client.close()
        await asyncio.wait_for(deferrals.seen.wait(), DEADLINE)
        assert "certificate verify failed: unable to get local issuer certificate" in (
            deferrals.replies[0])
        assert sink.message_count == 0

        sink_ca().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        hangup()
        await reloads.wait_reloads(1)
        [message] = await sink.await_messages(1, timeout=DEADLINE)
        assert message.tls and message.recipients == ("alice@old.example",)

        (tmp_path / "ca.pem").write_text("not a certificate\n")
        hangup()
        await reloads.wait_reloads(2)
        assert any(line.startswith(f"reload refused: {relay.path}: delivery.tls_ca_file: "
                                   f"cannot load {tmp_path / 'ca.pem'}: ")
                   for line in reloads.lines), reloads.lines
    finally:
        mail_log.removeHandler(deferrals)
        mail_log.setLevel(level)
