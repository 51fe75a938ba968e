"""`bounces.send_to = "spf-pass"` for real: `relay serve` in this process, the
repo's DNS server with the senders' SPF records, a recording sink as the
primary (on 127.0.0.2, so it is not us) refusing one recipient with 550.

A sender whose SPF failed gets no DSN: the mail log says `bounce suppressed:
spf=fail` and `relay_dsn_suppressed_total{reason="spf-fail"}` counts it; a
sender whose SPF passed gets its DSN, delivered to its MX. The primary sees
the verdict in Authentication-Results; `queue show --json` carries "spf".
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest

from relay import service
from relay.core import config as configuration
from relay.ops.cli.main import command_tree, main_group
from relay.ops.metrics import Metrics
from tests.component.test_spf import HOST, Session, add_spf_zone
from tests.support.deployment import to_toml
from tests.support.dns_server import DnsServer
from tests.support.log_lines import LogLines
from tests.support.relay_process import free_port
from tests.support.smtp_sink import Sink

command_tree()
PRIMARY = "127.0.0.2"
DEADLINE = 15.0


@pytest.fixture
def sink() -> Iterator[Sink]:
    primary = Sink(host=PRIMARY).start()
    primary.rcpt_reply["gone@verrotech.com"] = "550 5.1.1 <gone@verrotech.com>: no such user"
    primary.rcpt_reply["busy@verrotech.com"] = "450 4.2.1 mailbox busy"
    yield primary
    primary.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_bounces_go_only_to_senders_whose_spf_passed(
    tmp_path: Path, dns_server: DnsServer, sink: Sink, mail_log: LogLines,
) -> None:
    add_spf_zone(dns_server)
    dns_server.add("pass.example", "MX", "10 mx.pass.example.")  # where its DSN goes
    dns_server.add("mx.pass.example", "A", PRIMARY)
    port, metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    path = tmp_path / "relay.toml"
    path.write_text(to_toml({
        "node": {"hostname": HOST},
        "smtp": {"listen": [f"127.0.0.1:{port}"]},
        "queue": {"url": f"sqlite:///{tmp_path}/queue.db"},
        "delivery": {"port": sink.port, "min_backoff": "1h", "max_backoff": "1h"},
        "dns": {"nameservers": ["{}:{}".format(*dns_server.address)], "timeout": "2s"},
        "bounces": {"send_to": "spf-pass"},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "domains": {"verrotech.com": {"next_hop": f"{PRIMARY}:{sink.port}"}},
    }))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(service.serve(configuration.load(str(path)), stop=stop,
                                             on_ready=ready.set, poll_interval=0.1))
    try:
        await asyncio.wait_for(ready.wait(), DEADLINE)
        ids = {}
        for sender, rcpt in [("ann@fail.example", "gone@verrotech.com"),
                             ("ann@pass.example", "gone@verrotech.com"),
                             ("ann@soft.example", "busy@verrotech.com")]:
            session = await Session.open(port)
            assert (await session.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
            assert (await session.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
            if sender == "ann@pass.example":
                assert (await session.cmd("RCPT TO:<ok@verrotech.com>")).startswith("250")
            assert (await session.cmd("DATA")).startswith("354")
            reply = await session.cmd("Subject: hi\r\n\r\nHello.\r\n.")
            assert reply.startswith("250 2.0.0 Ok: queued as "), reply
            ids[sender] = reply.rsplit(" ", 1)[1]
            await session.close()

        fail_id, pass_id = ids["ann@fail.example"], ids["ann@pass.example"]
        await mail_log.wait(lambda: mail_log.count(
            f"{fail_id}: bounce suppressed: spf=fail, to=<ann@fail.example>") == 1)
        await asyncio.to_thread(sink.wait_for_messages, 2, DEADLINE)
        [delivered, dsn] = sink.received
        assert delivered.recipients == ("ok@verrotech.com",)
        assert delivered.data.startswith(
            f"Authentication-Results: {HOST}; spf=pass smtp.mailfrom=pass.example\r\n"
            "Received: from client.example".encode())
        assert (dsn.sender, dsn.recipients) == ("", ("ann@pass.example",))
        assert b"Action: failed" in dsn.data and b"gone@verrotech.com" in dsn.data
        assert not dsn.data.startswith(b"Authentication-Results:")  # ours: not checked
        assert mail_log.count(f"{pass_id}: dsn to=<ann@pass.example>") == 1
        assert mail_log.count("bounce suppressed") == 1

        text = await asyncio.to_thread(scrape, metrics_port)
        assert 'relay_dsn_suppressed_total{reason="spf-fail"} 1.0' in text

        soft_id = ids["ann@soft.example"]
        shown = await asyncio.to_thread(
            CliRunner().invoke, main_group, ["queue", "show", soft_id, "--json", "-c", str(path)])
        assert shown.exit_code == 0, shown.stderr
        assert json.loads(shown.stdout)["spf"] == "softfail"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def test_check_config_refuses_spf_pass_bounces_without_spf(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[smtp]\nspf = false\n[bounces]\nsend_to = "spf-pass"\n'
                    f'[queue]\nurl = "sqlite:///{tmp_path}/queue.db"\n')
    result = CliRunner().invoke(main_group, ["check-config", "-c", str(path)])
    assert result.exit_code == 1
    assert result.stderr == f'{path}: bounces.send_to: "spf-pass" needs smtp.spf = true\n'
    path.write_text('[bounces]\nsend_to = "spf-pass"\n'
                    f'[queue]\nurl = "sqlite:///{tmp_path}/queue.db"\n')
    assert CliRunner().invoke(main_group, ["check-config", "-c", str(path)]).exit_code == 0


def test_every_suppression_reason_is_exported_from_zero() -> None:
    text = generate_latest(Metrics().registry).decode()
    for result in ("fail", "softfail", "neutral", "none", "temperror", "permerror"):
        assert f'relay_dsn_suppressed_total{{reason="spf-{result}"}} 0.0' in text
    assert 'reason="spf-pass"' not in text
