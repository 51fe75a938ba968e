"""The parts of `relay demo` over real loopback sockets: its name server, its
MX-order sender and its recording primary (the whole demo runs in
tests/e2e/test_demo.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.resolver
import pytest

from relay.ops.demo.primary import Delivery, Primary
from relay.ops.demo.relays import DemoError, RelayNode
from relay.ops.demo.scenario import Result, free_port
from relay.ops.demo.sender import CLIENT_NAME, Sender
from relay.ops.demo.zone import HEKTOR, MX_HOSTS, NORWICH, PRIMARY, ZoneServer
from tests.support.smtp_sink import Sink


@pytest.fixture
async def zone() -> AsyncIterator[ZoneServer]:
    server = ZoneServer()
    await server.start()
    yield server
    server.close()


@pytest.fixture
def port() -> int:
    return free_port(*(h.address for h in MX_HOSTS))


def resolver(zone: ZoneServer) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers, r.port, r.lifetime = ["127.0.0.1"], zone.port, 2.0
    return r


async def test_zone_serves_the_reference_mx_set(zone: ZoneServer) -> None:
    r = resolver(zone)
    mx = sorted((rd.preference, rd.exchange.to_text()) for rd in await r.resolve(
        "verrotech.com", "MX"))
    assert mx == [(10, "mail.verrotech.com."), (20, "mail.verrotech.net."),
                  (30, "mail.noc.verrotech.com.")]
    for host in MX_HOSTS:
        assert [rd.to_text() for rd in await r.resolve(host.name.upper(), "A")] == [host.address]
    with pytest.raises(dns.resolver.NoAnswer):
        await r.resolve(HEKTOR.name, "AAAA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await r.resolve("sender.example", "MX")
    assert zone.answer(b"not a dns message") is None


async def test_sender_falls_back_in_mx_order_while_the_primary_is_down(
    zone: ZoneServer, port: int, smtp_sink: Callable[..., Sink],
) -> None:
    norwich = smtp_sink(NORWICH.address, port)
    sent = await Sender(("127.0.0.1", zone.port), port).send("alice@verrotech.com", 1)
    assert [(t.preference, t.result.split(" ", 1)[0]) for t in sent.tries] == [
        (10, "connection"), (20, "connection"), (30, "250")]
    assert sent.accepted_by is not None and sent.accepted_by.host == NORWICH.name
    [got] = await norwich.await_messages(1)
    assert got.recipients == ("alice@verrotech.com",)
    assert got.ehlo_name == CLIENT_NAME
    assert b"Message-ID: <demo-1@sender.example>" in got.data


async def test_sender_reports_a_message_no_mx_host_took(zone: ZoneServer, port: int) -> None:
    sent = await Sender(("127.0.0.1", zone.port), port).send("alice@verrotech.com", 2)
    assert sent.accepted_by is None
    assert [t.host for t in sent.tries] == [h.name for h in MX_HOSTS]
    assert all(t.result == "connection refused" for t in sent.tries)


async def test_primary_records_deliveries_by_message_id_and_counts_copies(
    zone: ZoneServer, port: int,
) -> None:
    seen: list[Delivery] = []
    primary = Primary(PRIMARY.name, PRIMARY.address, port, seen.append)
    sender = Sender(("127.0.0.1", zone.port), port)
    assert not await primary.wait_for({"<demo-1@sender.example>"}, 0.05)  # down: nothing
    await primary.start()
    try:
        for n in (1, 2, 1):
            sent = await sender.send("alice@verrotech.com", n)
            assert [t.preference for t in sent.tries] == [10]
        assert await primary.wait_for({"<demo-1@sender.example>", "<demo-2@sender.example>"}, 5)
    finally:
        await primary.close()
    assert primary.distinct() == {"<demo-1@sender.example>": 2, "<demo-2@sender.example>": 1}
    assert seen == [Delivery("<demo-1@sender.example>", CLIENT_NAME),
                    Delivery("<demo-2@sender.example>", CLIENT_NAME),
                    Delivery("<demo-1@sender.example>", CLIENT_NAME)]


@pytest.mark.parametrize(("counts", "ok"), [
    ((20, 20, 0, 0), True),
    ((20, 19, 1, 0), False),
    ((20, 20, 0, 2), False),
    ((0, 0, 0, 0), False),
])
def test_the_verdict_is_success_only_with_nothing_lost_or_duplicated(
    counts: tuple[int, int, int, int], ok: bool,
) -> None:
    result = Result(*counts)
    assert result.ok is ok
    line = "demo: {} sent, {} delivered to the primary, {} lost, {} duplicated"
    assert result.line == line.format(*counts)


def test_the_cli_loads_the_demo_and_rich_only_when_asked() -> None:
    code = ("import sys; from relay.ops.cli import main; "
            "assert 'rich' not in sys.modules and 'relay.ops.demo' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_a_relay_that_cannot_start_is_named_with_its_own_error(
    tmp_path: Path, port: int,
) -> None:
    async def ignore(relay: RelayNode, record: dict[str, Any]) -> None:
        return None

    node = RelayNode(HEKTOR, tmp_path, port, "127.0.0.1:1", ignore)
    node.config.write_text(node.config.read_text() + "\n[smtp2]\nx = 1\n")
    with pytest.raises(DemoError, match=r"^Hektor did not start: .*smtp2: unknown key"):
        await node.start(timeout=30)
    assert not node.running
