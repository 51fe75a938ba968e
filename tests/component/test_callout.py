"""Callout verification for real: `relay serve` in this process on loopback,
a recording sink as the primary (found by MX on the repo's DNS server, or as
`next_hop`) answering chosen recipients 250, 550 5.1.1 or 450, and raw
loopback servers that stall, reset or answer garbage. An unknown address is
probed at RCPT (EHLO, `MAIL FROM:<>`, `RCPT TO`, QUIT, no message) and the
answer decides and is learned; what the probe could not learn leaves
`unknown_recipient` to decide, within `verify_timeout`; probes are bounded
per address and per destination."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import delete, insert

from relay import service
from relay.core import config as configuration
from relay.core.clock import FakeClock
from relay.core.model import Hop
from relay.core.recipients import KnownState, Ttl
from relay.delivery.backoff import BackoffPolicy
from relay.delivery.callout import CalloutClient
from relay.delivery.resolver import NoRoute, Route
from relay.ops.cli.main import command_tree
from relay.queue import db
from relay.queue.schema import destinations
from relay.smtp.callouts import Callouts
from relay.smtp.verify import KnownRecipients
from tests.component.test_learned_recipients import Client, Relay, rcpt, stop
from tests.support.deployment import merge, to_toml
from tests.support.dns_server import DnsServer
from tests.support.log_lines import LogLines, capturing
from tests.support.relay_process import free_port
from tests.support.smtp_sink import Sink

DOMAIN = "company.example"
DEADLINE = 15.0
TIMEOUT = 1.0  # verify_timeout in these tests
MARGIN = 0.5  # what a RCPT reply may take beyond it on a busy machine
UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
UNVERIFIED = "450 4.1.1 <{}>: Recipient address rejected: unverified address"


@pytest.fixture
def sink() -> Iterator[Sink]:
    primary = Sink("127.0.0.2").start()  # not our own address: MX loop avoidance
    primary.rcpt_reply["bob@company.example"] = "550 5.1.1 <bob@company.example>: no such user"
    primary.rcpt_reply["cy@company.example"] = "450 4.2.1 mailbox busy"
    yield primary
    primary.stop()


@pytest.fixture
async def callout_log() -> AsyncIterator[LogLines]:
    """Lines of `relay.smtp.callouts`."""
    async with capturing(LogLines(deadline=DEADLINE), "relay.smtp.callouts",
                         logging.DEBUG) as handler:
        yield handler


@pytest.fixture
async def relays(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Relay]]]:
    """Start `relay serve` here with a callout domain; all stopped at teardown."""
    started: list[Relay] = []

    async def start(domain: dict[str, Any], **overrides: Any) -> Relay:
        port = free_port("127.0.0.1")
        settings = merge({
            "node": {"hostname": "relay.example"},
            "smtp": {"listen": [f"127.0.0.1:{port}"]},
            "queue": {"url": f"sqlite:///{tmp_path}/queue.db"},
            "delivery": {"min_backoff": "1m", "max_backoff": "1h", "connect_timeout": "2s"},
            "dns": {"nameservers": ["127.0.0.1:1"], "timeout": "1s"},
            "metrics": {"listen": ""},
            "domains": {DOMAIN: {"verify": "callout", "verify_timeout": f"{TIMEOUT}s",
                                 **domain}},
        }, overrides)
        path = tmp_path / "relay.toml"
        path.write_text(to_toml(settings))
        relay = Relay(settings, path, port)
        ready = asyncio.Event()
        relay.task = asyncio.create_task(service.serve(
            configuration.load(str(path)), config_path=str(path), stop=relay.stop,
            on_ready=ready.set, poll_interval=0.2, known_refresh=0.1))
        started.append(relay)
        await asyncio.wait_for(ready.wait(), DEADLINE)
        return relay

    yield start
    for relay in started:
        await stop(relay)


class Hop_:
    """A raw next hop on loopback that counts connections and answers as told:
    `stall` (never a byte), `reset` (closed at once), `garbage` (a greeting that
    is no SMTP), or `hold` (a normal dialogue whose RCPT waits for `release`)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.rcpt_seen = asyncio.Event()
        self.rcpts = 0
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Hop_:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        if self.mode == "reset":
            writer.transport.abort()
            return
        if self.mode == "stall":
            await reader.read()  # until the client gives up
            writer.close()
            return
        if self.mode == "garbage":
            writer.write(b"HELLO? \xff\xfe this is no SMTP server\r\n")
            await reader.read()
            writer.close()
            return
        writer.write(b"220 hold.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"RCPT":
                self.rcpts += 1
                self.rcpt_seen.set()
                await self.release.wait()
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            elif verb == b"EHLO":
                writer.write(b"250-hold.test\r\n250 8BITMIME\r\n")
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self.server.wait_closed()


@pytest.fixture
async def raw_hop() -> AsyncIterator[Callable[[str], Awaitable[Hop_]]]:
    hops: list[Hop_] = []

    async def make(mode: str) -> Hop_:
        hop = await Hop_(mode).start()
        hops.append(hop)
        return hop

    yield make
    for hop in hops:
        await hop.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def listed(path: Path) -> list[dict[str, Any]]:
    result = CliRunner().invoke(command_tree(), ["recipients", "list", "--json", "-c", str(path)])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, Any]] = json.loads(result.output)
    return rows


# -- over SMTP ----------------------------------------------------------------------------


async def test_an_unknown_address_is_probed_on_the_mx_and_the_answer_decides_and_is_learned(
    relays: Callable[..., Awaitable[Relay]], sink: Sink, dns_server: DnsServer,
    callout_log: LogLines, mail_log: LogLines,
) -> None:
    dns_server.add(DOMAIN, "MX", "10 mx.company.example.")
    dns_server.add("mx.company.example", "A", sink.host)
    host, port = dns_server.address
    metrics_port = free_port("127.0.0.1")
    relay = await relays({}, delivery={"port": sink.port},
                         dns={"nameservers": [f"{host}:{port}"]},
                         metrics={"listen": f"127.0.0.1:{metrics_port}"})

    assert await rcpt(relay.port, "Ann@company.example", "bob@company.example",
                      "cy@company.example") == [
        "250 2.1.5 Ok",  # 250 at the primary
        UNKNOWN.format("bob@company.example"),  # 550 5.1.1 there: ours
        "250 2.1.5 Ok",  # 450 there: unknown, and unknown_recipient = "accept"
    ]
    await mail_log.wait(lambda: mail_log.count("callout <") == 3)  # each logged after QUIT
    assert sink.session_count == 3
    for session in sink.sessions:  # a probe sends no message
        assert session.commands == ["EHLO", "MAIL", "RCPT", "QUIT"]
        assert session.ehlo_name == "relay.example"
    assert sink.received == []
    await callout_log.wait(lambda: callout_log.count("stored") == 2)
    assert mail_log.count("callout <Ann@company.example> via mx.company.example[127.0.0.2]"
                          f":{sink.port}: valid (250 ") == 1
    assert mail_log.count("callout <cy@company.example> via ") == 1
    assert mail_log.count(": unknown (450 4.2.1 mailbox busy)") == 1

    # The verdicts are cached: asked again, only the 450 one probes again.
    assert await rcpt(relay.port, "ann@company.example", "Bob@company.example",
                      "cy@company.example") == [
        "250 2.1.5 Ok", UNKNOWN.format("Bob@company.example"), "250 2.1.5 Ok"]
    assert sink.session_count == 4

    rows = await asyncio.to_thread(listed, relay.path)
    assert [(r["address"], r["state"], r["source"]) for r in rows] == [
        ("Ann@company.example", "valid", "callout"),
        ("bob@company.example", "invalid", "callout"),
    ]
    text = await asyncio.to_thread(scrape, metrics_port)
    assert 'relay_callouts_total{result="valid"} 1.0' in text
    assert 'relay_callouts_total{result="invalid"} 1.0' in text
    assert 'relay_callouts_total{result="unknown"} 2.0' in text
    assert 'relay_recipient_checks_total{result="valid"} 2.0' in text
    assert 'relay_recipient_checks_total{result="invalid"} 2.0' in text
    assert 'relay_recipient_checks_total{result="unknown"} 2.0' in text


async def test_a_next_hop_that_stalls_costs_one_verify_timeout_then_is_left_alone(
    relays: Callable[..., Awaitable[Relay]], raw_hop: Callable[[str], Awaitable[Hop_]],
) -> None:
    hop = await raw_hop("stall")
    relay = await relays({"next_hop": f"127.0.0.1:{hop.port}", "unknown_recipient": "tempfail"})
    client = await Client.open(relay.port)

    started = time.monotonic()
    reply = await client.cmd("RCPT TO:<ann@company.example>")
    took = time.monotonic() - started
    assert reply == UNVERIFIED.format("ann@company.example")
    assert TIMEOUT - 0.1 <= took <= TIMEOUT + MARGIN
    assert hop.connections == 1

    # Until its next backoff step (delivery.min_backoff = 1m) nobody asks it again.
    started = time.monotonic()
    assert await client.cmd("RCPT TO:<bea@company.example>") == UNVERIFIED.format(
        "bea@company.example")
    assert time.monotonic() - started < TIMEOUT / 2
    assert hop.connections == 1
    await client.close()


async def test_a_reload_turns_callout_on(
    relays: Callable[..., Awaitable[Relay]], sink: Sink,
) -> None:
    from tests.component.test_reload import hangup

    relay = await relays({"next_hop": f"{sink.host}:{sink.port}", "verify": "learned"})
    assert await rcpt(relay.port, "bob@company.example") == ["250 2.1.5 Ok"]
    assert sink.session_count == 0

    settings = merge(relay.settings, {"domains": {DOMAIN: {"verify": "callout"}}})
    relay.path.write_text(to_toml(settings))
    async with capturing(LogLines(deadline=DEADLINE), "relay.service",
                         logging.INFO) as reloads:
        hangup()
        await reloads.wait(lambda: reloads.count("reload") >= 1)
    assert await rcpt(relay.port, "bob@company.example") == [
        UNKNOWN.format("bob@company.example")]
    assert sink.session_count == 1


# -- the probe and its bounds, without a relay around them -------------------------------


class _Routes:
    """Every destination's one hop: a port on loopback."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port, self.host = port, host

    async def route(self, domain: str, next_hop: str = "") -> Route:
        return Route((Hop("hop.test", self.host, self.port, 0),))


def _callouts(port: int, clock: FakeClock, known: KnownRecipients | None = None,
              host: str = "127.0.0.1") -> Callouts:
    return Callouts(
        prober=CalloutClient(helo_name="relay.example", tls="opportunistic"),
        resolver=_Routes(port, host), clock=clock,
        known=known if known is not None else KnownRecipients(),
        backoff=BackoffPolicy(min_backoff=60.0, max_backoff=3600.0, max_lifetime=86400.0),
    )


@pytest.mark.parametrize("mode", ["reset", "garbage", "stall"])
async def test_a_hop_that_resets_or_answers_garbage_teaches_nothing(
    raw_hop: Callable[[str], Awaitable[Hop_]], mode: str,
) -> None:
    hop = await raw_hop(mode)
    client = CalloutClient(helo_name="relay.example", tls="opportunistic")
    probe = await client.probe("ann@company.example",
                               [Hop("hop.test", "127.0.0.1", hop.port, 0)], 0.5)
    assert (probe.result, probe.answered, probe.state) == ("unknown", False, None)
    assert probe.host == f"hop.test[127.0.0.1]:{hop.port}"


async def test_the_hops_are_tried_in_order_until_one_answers(sink: Sink) -> None:
    from tests.support.smtp_sink import closed_port

    client = CalloutClient(helo_name="relay.example", tls="opportunistic")
    probe = await client.probe("bob@company.example", [
        Hop("down.test", "127.0.0.1", closed_port(), 10),
        Hop("up.test", sink.host, sink.port, 20)], TIMEOUT)
    assert (probe.result, probe.answered) == ("invalid", True)
    assert probe.reply == "550 5.1.1 <bob@company.example>: no such user"


async def test_a_hop_that_did_not_answer_is_probed_again_at_its_next_backoff_step(
    raw_hop: Callable[[str], Awaitable[Hop_]],
) -> None:
    hop = await raw_hop("reset")
    clock = FakeClock(datetime(2026, 5, 1, tzinfo=UTC))
    callouts = _callouts(hop.port, clock)
    assert await callouts.check("a@x.test", "a@x.test", "x.test", TIMEOUT) is None
    assert await callouts.check("b@x.test", "b@x.test", "x.test", TIMEOUT) is None
    assert hop.connections == 1  # down for min_backoff
    clock.advance(59)
    assert await callouts.check("c@x.test", "c@x.test", "x.test", TIMEOUT) is None
    assert hop.connections == 1
    clock.advance(1)
    assert await callouts.check("d@x.test", "d@x.test", "x.test", TIMEOUT) is None
    assert hop.connections == 2  # its step came: one probe, which failed again
    clock.advance(60)
    assert await callouts.check("e@x.test", "e@x.test", "x.test", TIMEOUT) is None
    assert hop.connections == 2  # the second failure doubled the wait
    clock.advance(60)
    assert await callouts.check("f@x.test", "f@x.test", "x.test", TIMEOUT) is None
    assert hop.connections == 3


async def test_a_destination_down_in_the_queue_is_not_probed(sink: Sink) -> None:
    callouts = _callouts(sink.port, FakeClock(), host=sink.host)
    callouts.see_down(["x.test"])
    assert await callouts.check("a@x.test", "a@x.test", "x.test", TIMEOUT) is None
    callouts.see_down([])
    assert await callouts.check("a@x.test", "a@x.test", "x.test", TIMEOUT) is KnownState.VALID
    assert sink.session_count == 1


async def test_rcpts_for_one_address_at_once_share_one_probe(
    raw_hop: Callable[[str], Awaitable[Hop_]],
) -> None:
    hop = await raw_hop("hold")
    clock, known = FakeClock(), KnownRecipients()
    callouts = _callouts(hop.port, clock, known)
    first = asyncio.create_task(callouts.check("ann@x.test", "ann@x.test", "x.test", DEADLINE))
    second = asyncio.create_task(callouts.check("Ann@x.test", "ann@x.test", "x.test", DEADLINE))
    await asyncio.wait_for(hop.rcpt_seen.wait(), DEADLINE)  # both tasks ran before the probe
    hop.release.set()
    assert await asyncio.gather(first, second) == [KnownState.VALID, KnownState.VALID]
    assert hop.connections == 1
    # the verdict is in this node's copy at once: the policy's next RCPT asks no one
    assert known.state("ann@x.test", Ttl(60.0, 60.0), clock.now()) is KnownState.VALID


async def test_at_most_three_probes_run_at_once_to_one_destination(
    raw_hop: Callable[[str], Awaitable[Hop_]],
) -> None:
    hop = await raw_hop("hold")
    callouts = _callouts(hop.port, FakeClock())
    checks = [asyncio.create_task(callouts.check(f"u{n}@x.test", f"u{n}@x.test", "x.test",
                                                 DEADLINE)) for n in range(4)]

    async def three_held() -> None:
        while hop.rcpts < 3:
            hop.rcpt_seen.clear()
            await hop.rcpt_seen.wait()

    await asyncio.wait_for(three_held(), DEADLINE)
    assert (hop.connections, hop.rcpts) == (3, 3)  # the fourth waits for a slot
    hop.release.set()
    assert await asyncio.gather(*checks) == [KnownState.VALID] * 4
    assert hop.connections == 4


async def test_a_rcpt_never_waits_longer_than_its_timeout_for_a_probe_in_flight(
    raw_hop: Callable[[str], Awaitable[Hop_]],
) -> None:
    hop = await raw_hop("hold")
    callouts = _callouts(hop.port, FakeClock())
    started = time.monotonic()
    assert await callouts.check("ann@x.test", "ann@x.test", "x.test", 0.3) is None
    assert time.monotonic() - started < 0.3 + MARGIN
    assert hop.connections == 1


async def test_a_destination_delivery_found_down_is_not_probed_until_it_is_up(
    relays: Callable[..., Awaitable[Relay]], sink: Sink, callout_log: LogLines,
    tmp_path: Path,
) -> None:
    relay = await relays({"next_hop": f"{sink.host}:{sink.port}",
                          "unknown_recipient": "tempfail"})
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    now = datetime.now(UTC)

    def write(statement: Any) -> None:
        with engine.begin() as conn:
            conn.execute(statement)

    await asyncio.to_thread(write, insert(destinations).values(
        name=DOMAIN, up=False, failures=1, retry_at=now + timedelta(hours=1),
        last_error="451 4.4.1 connect to ...: Connection refused", updated_at=now,
        down_since=now))
    await callout_log.wait(lambda: callout_log.count(f"down in the queue now: {DOMAIN}") == 1)
    assert await rcpt(relay.port, "ann@company.example") == [UNVERIFIED.format(
        "ann@company.example")]
    assert sink.session_count == 0

    await asyncio.to_thread(write, delete(destinations))
    await callout_log.wait(lambda: callout_log.count("down in the queue now: none") == 1)
    assert await rcpt(relay.port, "ann@company.example") == ["250 2.1.5 Ok"]
    assert sink.session_count == 1
    engine.dispose()


async def test_tls_required_by_delivery_is_required_by_a_probe() -> None:
    primary = Sink("127.0.0.2", tls=True).start()
    try:
        hops = [Hop("127.0.0.2", primary.host, primary.port, 0)]
        client = CalloutClient(helo_name="relay.example", tls="required")
        probe = await client.probe("ann@x.test", hops, TIMEOUT)
        assert (probe.result, probe.answered) == ("valid", True)
        assert [s.tls for s in primary.sessions] == [True]
        primary.hide_starttls = True
        probe = await client.probe("ann@x.test", hops, TIMEOUT)
        assert (probe.result, probe.answered) == ("unknown", False)
        assert probe.reply == "TLS is required, but was not offered"
        assert primary.sessions[-1].commands == ["EHLO"]
        # opportunistic: a probe carries no message, so it does not bother with TLS
        plain = CalloutClient(helo_name="relay.example", tls="opportunistic")
        assert (await plain.probe("ann@x.test", hops, TIMEOUT)).result == "valid"
        assert primary.sessions[-1].tls is False
    finally:
        primary.stop()


async def test_a_utf8_address_is_asked_with_smtputf8_or_not_at_all(sink: Sink) -> None:
    hops = [Hop("hop.test", sink.host, sink.port, 0)]
    client = CalloutClient(helo_name="relay.example", tls="none")
    assert (await client.probe("jürgen@x.test", hops, TIMEOUT)).result == "valid"
    sink.smtputf8 = False
    probe = await client.probe("jürgen@x.test", hops, TIMEOUT)
    assert (probe.result, probe.answered) == ("unknown", False)
    assert "SMTPUTF8" in probe.reply


async def test_a_probe_that_could_not_test_a_down_destination_leaves_the_next_one_to(
    raw_hop: Callable[[str], Awaitable[Hop_]],
) -> None:
    hop = await raw_hop("reset")
    clock = FakeClock(datetime(2026, 5, 1, tzinfo=UTC))
    callouts = _callouts(hop.port, clock)
    routes = callouts.resolver
    assert await callouts.check("a@x.test", "a@x.test", "x.test", TIMEOUT) is None
    clock.advance(60)  # its backoff step: one probe, which finds no route at all
    callouts.resolver = _NoRoutes()
    assert await callouts.check("b@x.test", "b@x.test", "x.test", TIMEOUT) is None
    callouts.resolver = routes
    assert await callouts.check("c@x.test", "c@x.test", "x.test", TIMEOUT) is None
    assert hop.connections == 2  # the hops were tested by the next RCPT


class _NoRoutes:
    async def route(self, domain: str, next_hop: str = "") -> NoRoute:
        return NoRoute(True, f"{domain} has a null MX", "5.1.10")
