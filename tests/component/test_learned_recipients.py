"""Learned recipients for real: `relay serve` in this process on loopback, a
recording sink as the primary answering chosen recipients 250, 550 5.1.1 or
450, real SQLite and PostgreSQL queues. What a delivery teaches decides the
next RCPT TO (550 5.1.1, accepted, or `unknown_recipient`), survives a
restart and reaches a second relay on the same queue; the queue's table is
checked on both backends."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relay import service
from relay.core import config as configuration
from relay.core.model import Outcome, RecipientStatus
from relay.core.recipients import KnownState, Learned, Source
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import Attempt, NewMessage, RecipientUpdate, Recorded
from tests.component.test_reload import hangup
from tests.support.deployment import merge, to_toml
from tests.support.log_lines import LogLines, capturing
from tests.support.relay_process import free_port
from tests.support.smtp_lines import LineClient, Reply
from tests.support.smtp_sink import Sink

DOMAIN = "company.example"
DEADLINE = 15.0
T0 = datetime(2026, 5, 1, tzinfo=UTC)
UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
UNVERIFIED = "450 4.1.1 <{}>: Recipient address rejected: unverified address"


# -- a relay in this process ---------------------------------------------------------




@pytest.fixture
async def verify_log() -> AsyncIterator[LogLines]:
    """Lines of `relay.smtp.verify`."""
    async with capturing(LogLines(deadline=DEADLINE), "relay.smtp.verify",
                         logging.DEBUG) as handler:
        yield handler


@pytest.fixture
def sink() -> Iterator[Sink]:
    primary = Sink().start()
    primary.rcpt_reply["bob@company.example"] = "550 5.1.1 <bob@company.example>: no such user"
    primary.rcpt_reply["cy@company.example"] = "450 4.2.1 mailbox busy"
    yield primary
    primary.stop()


@dataclass
class Relay:
    settings: dict[str, Any]
    path: Path
    port: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@pytest.fixture
async def relays(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start `relay serve` here on a config built from overrides; all stopped at teardown."""
    started: list[Relay] = []

    async def start(name: str, sink: Sink, *, poll: float = 0.2, **overrides: Any) -> Relay:
        port = free_port("127.0.0.1")
        settings = merge({
            "node": {"hostname": f"{name}.example"},
            "smtp": {"listen": [f"127.0.0.1:{port}"], "spf": False},  # no DNS here
            "queue": {"url": f"sqlite:///{tmp_path}/queue.db"},
            "delivery": {"min_backoff": "1s", "max_backoff": "1s", "connect_timeout": "2s"},
            "dns": {"nameservers": ["127.0.0.1:1"], "timeout": "1s"},
            "metrics": {"listen": ""},
            "domains": {DOMAIN: {"next_hop": f"127.0.0.1:{sink.port}", "verify": "learned"}},
        }, overrides)
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(settings))
        relay = Relay(settings, path, port)
        ready = asyncio.Event()
        relay.task = asyncio.create_task(service.serve(
            configuration.load(str(path)), config_path=str(path), stop=relay.stop,
            on_ready=ready.set,
            poll_interval=poll, known_refresh=0.1))
        started.append(relay)
        await asyncio.wait_for(ready.wait(), DEADLINE)
        return relay

    yield start
    for relay in started:
        await stop(relay)


async def stop(relay: Relay) -> None:
    relay.stop.set()
    if relay.task is not None:
        await asyncio.wait_for(relay.task, 60)


# -- an SMTP client ---------------------------------------------------------------------


class Client(LineClient[str]):
    """Replies as their last line; a session opened up to MAIL FROM:<>."""

    deadline = DEADLINE

    @classmethod
    async def open(cls, port: int) -> Client:
        client = await cls.greeted(port)
        assert (await client.cmd("EHLO client.example")).startswith("250")
        assert (await client.cmd("MAIL FROM:<>")).startswith("250")
        return client

    def shaped(self, reply: Reply) -> str:
        return reply.raw[-1]

    async def close(self) -> None:
        await self.cmd("QUIT")
        await super().close()


async def rcpt(port: int, *addresses: str) -> list[str]:
    """The replies to RCPT TO for each address, in one transaction."""
    client = await Client.open(port)
    replies = [await client.cmd(f"RCPT TO:<{a}>") for a in addresses]
    await client.close()
    return replies


async def send(port: int, *addresses: str) -> None:
    client = await Client.open(port)
    for address in addresses:
        assert (await client.cmd(f"RCPT TO:<{address}>")).startswith("250"), address
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd("Subject: hi\r\n\r\nHello.\r\n.")).startswith("250")
    await client.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


# -- over SMTP ------------------------------------------------------------------------------


async def test_a_delivery_teaches_which_recipients_the_next_hop_refuses_and_accepts(
    relays: Callable[..., Any], sink: Sink, verify_log: LogLines,
) -> None:
    metrics_port = free_port("127.0.0.1")
    relay = await relays("a", sink, metrics={"listen": f"127.0.0.1:{metrics_port}"})
    assert await rcpt(relay.port, "bob@company.example") == ["250 2.1.5 Ok"]  # nothing known

    await send(relay.port, "ann@company.example", "bob@company.example", "cy@company.example")
    await verify_log.wait(lambda: verify_log.count("2 taught by a delivery") == 1)
    [message] = sink.received
    assert message.recipients == ("ann@company.example",)

    assert await rcpt(relay.port, "Bob@company.example", "ann@company.example",
                      "cy@company.example", "dan@company.example") == [
        UNKNOWN.format("Bob@company.example"),  # known-invalid: refused without asking anyone
        "250 2.1.5 Ok",  # known-valid
        "250 2.1.5 Ok",  # 450 taught nothing: unknown, and unknown_recipient = "accept"
        "250 2.1.5 Ok",
    ]
    assert sink.session_count == 1  # the refusal asked no one
    text = await asyncio.to_thread(scrape, metrics_port)
    assert 'relay_recipient_checks_total{result="invalid"} 1.0' in text
    assert 'relay_recipient_checks_total{result="valid"} 1.0' in text
    assert 'relay_recipient_checks_total{result="unknown"} 6.0' in text  # 1 + 3 sent + 2
    assert 'relay_smtp_rejections_total{reason="unknown_recipient"} 1.0' in text


async def test_what_was_learned_survives_a_restart_and_unknown_may_be_tempfailed(
    relays: Callable[..., Any], sink: Sink, verify_log: LogLines, tmp_path: Path,
) -> None:
    first = await relays("a", sink)
    await send(first.port, "ann@company.example", "bob@company.example", "cy@company.example")
    await verify_log.wait(lambda: verify_log.count("taught by a delivery") == 1)
    await stop(first)

    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")  # a new engine on the same file
    try:
        stored = {(r.key, r.state, r.source) for r in Queue(engine).known_recipients()}
    finally:
        engine.dispose()
    assert stored == {("ann@company.example", KnownState.VALID, Source.DELIVERY),
                      ("bob@company.example", KnownState.INVALID, Source.DELIVERY)}

    second = await relays("b", sink, domains={DOMAIN: {"unknown_recipient": "tempfail"}})
    assert await rcpt(second.port, "bob@company.example", "ann@company.example",
                      "cy@company.example") == [
        UNKNOWN.format("bob@company.example"),
        "250 2.1.5 Ok",
        UNVERIFIED.format("cy@company.example"),
    ]


async def test_a_static_list_decides_instead_of_what_was_learned(
    relays: Callable[..., Any], sink: Sink, verify_log: LogLines,
) -> None:
    relay = await relays("a", sink)
    await send(relay.port, "bob@company.example")
    await verify_log.wait(lambda: verify_log.count("1 taught by a delivery") == 1)
    await stop(relay)
    listed = await relays("b", sink, domains={DOMAIN: {"recipients": ["bob"]}})
    assert await rcpt(listed.port, "bob@company.example", "ann@company.example") == [
        "250 2.1.5 Ok", UNKNOWN.format("ann@company.example")]


async def test_a_reload_that_turns_verify_on_takes_what_the_queue_knows(
    relays: Callable[..., Any], sink: Sink, verify_log: LogLines, tmp_path: Path,
) -> None:
    relay = await relays("a", sink, domains={DOMAIN: {"verify": "off"}})
    engine = db.connect(f"sqlite:///{tmp_path}/queue.db")
    try:  # what another node (or an import) left in the queue
        queue = Queue(engine)
        queue.put_many([NewMessage("M1", "", ("x@company.example",), b"x", T0)])
        [claimed] = queue.claim_ids(["M1"], "elsewhere", T0, 3600)
        queue.apply([Attempt(message_id="M1", owner="elsewhere", lease_until=claimed.lease_until,
                             at=datetime.now(UTC), recipients=(), next_attempt_at=None,
                             learned=(Learned("bob@company.example", KnownState.INVALID),))])
    finally:
        engine.dispose()
    assert await rcpt(relay.port, "bob@company.example") == ["250 2.1.5 Ok"]  # verify off

    relay.path.write_text(to_toml(merge(relay.settings, {"domains": {DOMAIN: {
        "verify": "learned", "unknown_recipient": "tempfail"}}})))
    hangup()
    await verify_log.wait(lambda: verify_log.count("changed in the queue") >= 1)
    assert await rcpt(relay.port, "bob@company.example", "ann@company.example") == [
        UNKNOWN.format("bob@company.example"), UNVERIFIED.format("ann@company.example")]


@pytest.mark.postgresql
async def test_two_relays_on_one_postgresql_queue_share_what_one_learned(
    relays: Callable[..., Any], sink: Sink, verify_log: LogLines, postgres_db_url: str,
) -> None:
    queue = {"url": postgres_db_url}
    teacher = await relays("a", sink, queue=queue)
    await send(teacher.port, "ann@company.example", "bob@company.example")
    await verify_log.wait(lambda: verify_log.count("taught by a delivery") == 1)
    # b starts once a has delivered everything: all b knows, it learns from the queue.
    learner = await relays("b", sink, poll=3600.0, queue=queue)

    while True:  # b learns it at one of its next refreshes, which it logs
        seen = len(verify_log.lines)
        if (await rcpt(learner.port, "bob@company.example"))[0].startswith("550"):
            break
        await verify_log.wait(lambda seen=seen: len(verify_log.lines) > seen)  # type: ignore[misc]
    assert await rcpt(learner.port, "ann@company.example") == ["250 2.1.5 Ok"]
    [message] = sink.received
    assert message.ehlo_name == "a.example"  # the teacher delivered: b learned it from the queue


# -- the table, on both backends ---------------------------------------------------------------


def _leased(queue: Queue, *addresses: str) -> Attempt:
    """A message put and claimed; the attempt that delivers all its recipients."""
    queue.put_many([NewMessage("M1", "", addresses, b"x", T0)])
    [claimed] = queue.claim_due("me", T0, 10, 3600)
    return Attempt(
        message_id="M1", owner="me", lease_until=claimed.lease_until, at=T0,
        recipients=tuple(RecipientUpdate(r.id, r.address, RecipientStatus.DELIVERED, "250 ok",
                                         Outcome.DELIVERED) for r in claimed.recipients),
        next_attempt_at=None,
    )


def test_a_recorded_attempt_upserts_what_it_taught_and_a_new_state_restarts_learned_at(
    queue: Queue,
) -> None:
    attempt = _leased(queue, "Ann@company.example")
    taught = (Learned("Ann@company.example", KnownState.VALID),
              Learned("bob@company.example", KnownState.INVALID))
    assert queue.apply([_with(attempt, taught, T0)]) == [Recorded.STORED]
    later = T0 + timedelta(hours=1)
    queue.put_many([NewMessage("M2", "", ("ann@company.example",), b"x", T0)])
    [claimed] = queue.claim_due("me", later, 10, 3600)
    second = Attempt(message_id="M2", owner="me", lease_until=claimed.lease_until, at=later,
                     recipients=(), next_attempt_at=later,
                     learned=(Learned("ann@company.example", KnownState.VALID),
                              Learned("bob@company.example", KnownState.VALID)))
    assert queue.apply([second]) == [Recorded.STORED]
    rows = {r.key: r for r in queue.known_recipients()}
    assert rows["ann@company.example"].learned_at == T0  # same state: only seen again
    assert rows["ann@company.example"].last_seen_at == later
    assert rows["bob@company.example"].state is KnownState.VALID
    assert rows["bob@company.example"].learned_at == later  # a new state: learned now
    changed, total = queue.known_changes(later)
    assert total == 2 and {r.key for r in changed} == {"ann@company.example",
                                                       "bob@company.example"}
    assert queue.known_changes(later + timedelta(seconds=1)) == ([], 2)


def test_a_stale_attempt_teaches_nothing(queue: Queue) -> None:
    attempt = _leased(queue, "ann@company.example")
    stale = _with(attempt, (Learned("ann@company.example", KnownState.VALID),), T0)
    stale = Attempt(**{**_fields(stale), "owner": "someone-else"})
    assert queue.apply([stale]) == [Recorded.STALE]
    assert queue.known_recipients() == []


def test_import_and_forget_each_take_one_transaction(queue: Queue) -> None:
    assert queue.import_recipients(["ann@company.example", "ANN@company.example",
                                    "bob@company.example"], T0) == 2
    assert [(r.key, r.source) for r in queue.known_recipients(state="valid")] == [
        ("ann@company.example", Source.IMPORT), ("bob@company.example", Source.IMPORT)]
    assert queue.known_recipients(domain="other.example") == []
    assert queue.forget_recipients(["Bob@COMPANY.example", "nobody@company.example"]) == [
        "bob@company.example"]
    assert [r.key for r in queue.known_recipients()] == ["ann@company.example"]


def _fields(attempt: Attempt) -> dict[str, Any]:
    return {name: getattr(attempt, name) for name in attempt.__dataclass_fields__}


def _with(attempt: Attempt, learned: tuple[Learned, ...], at: datetime) -> Attempt:
    return Attempt(**{**_fields(attempt), "learned": learned, "at": at})


def test_pruning_drops_per_domain_and_state_what_expired(queue: Queue) -> None:
    queue.import_recipients(["old@company.example", "old@other.example"], T0)
    later = T0 + timedelta(days=2)
    learn_at = _leased(queue, "x@company.example")
    queue.apply([_with(learn_at, (Learned("bad@company.example", KnownState.INVALID),
                                  Learned("new@company.example", KnownState.VALID)), later)])
    cutoff = later - timedelta(days=1)
    # company.example keeps valid addresses 1 day and invalid ones 3 days
    assert queue.prune_known({DOMAIN: (cutoff, later - timedelta(days=3))}) == 1
    assert [r.key for r in queue.known_recipients()] == [
        "bad@company.example", "new@company.example", "old@other.example"]
    assert queue.prune_known({}) == 0
