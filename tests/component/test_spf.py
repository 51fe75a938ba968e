"""SPF at MAIL FROM for real: SMTP sessions on loopback, the repo's DNS server
serving the senders' TXT records, pyspf answering through our resolver.

Each result (pass, fail, softfail, neutral, none, permerror, temperror) is
stored with the message and stated in the prepended Authentication-Results
header; a name server that never answers gives temperror within dns.timeout.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.core import config as configuration
from relay.core.clock import FakeClock
from relay.core.dnscache import new_cache
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import NewMessage
from relay.smtp.listeners import start_listeners
from relay.smtp.spf import SpfCheck
from tests.component.test_reload import ReloadLog, Served, hangup, reloads, serving
from tests.support.dns_server import DnsServer
from tests.support.smtp_lines import LineClient, Reply

HOST = "mail.verrotech.net"
DEADLINE = 15.0
TIMEOUT = 0.5  # dns.timeout of these tests
__all__ = ["reloads", "serving"]  # fixtures of test_reload, used here


def add_spf_zone(dns: DnsServer) -> None:
    """Senders' domains, one per SPF result; the client connects from 127.0.0.1."""
    dns.add("pass.example", "TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')
    dns.add("fail.example", "TXT", '"v=spf1 ip4:192.0.2.1 -all"')
    dns.add("soft.example", "TXT", '"v=spf1 ip4:192.0.2.1 ~all"')
    dns.add("neutral.example", "TXT", '"v=spf1 ?all"')
    dns.add("none.example", "A", "192.0.2.9")  # exists, publishes no SPF
    dns.add("broken.example", "TXT", '"v=spf1 ip4:192.0.2.1 bogus:x -all"')
    dns.add("mx.example", "TXT", '"v=spf1 mx -all"')  # pass through its MX host's address
    dns.add("mx.example", "MX", "10 smtp.mx.example.")
    dns.add("smtp.mx.example", "A", "127.0.0.1")
    dns.add("slow.example", "TXT", '"v=spf1 +all"')
    dns.drop("slow.example")  # never answered: the check times out


class Session(LineClient[str]):
    """A bare SMTP client: one reply line per command, the last of a multi-line one."""

    deadline = DEADLINE

    @classmethod
    async def open(cls, port: int, helo: str = "client.example") -> Session:
        session = await cls.greeted(port)
        assert (await session.cmd(f"EHLO {helo}")).startswith("250")
        return session

    def shaped(self, reply: Reply) -> str:
        return reply.raw[-1]

    async def send(self, sender: str) -> str:
        """One message from `sender`; the reply to MAIL FROM."""
        mail = await self.cmd(f"MAIL FROM:<{sender}>")
        assert (await self.cmd("RCPT TO:<bob@verrotech.com>")).startswith("250")
        assert (await self.cmd("DATA")).startswith("354")
        assert (await self.cmd("Subject: hi\r\n\r\nHello.\r\n.")).startswith("250")
        return mail

    async def close(self) -> None:
        await self.cmd("QUIT")
        await super().close()


Start = Callable[..., Awaitable[tuple[int, list[NewMessage]]]]


@pytest.fixture
async def relay(tmp_path: Path, dns_server: DnsServer) -> AsyncIterator[Start]:
    """Listeners with SPF on the DNS fixture (or off); what they store is kept in a list."""
    add_spf_zone(dns_server)
    running = []
    checks = []

    async def start(spf: bool = True) -> tuple[int, list[NewMessage]]:
        config = configuration.from_mapping({
            "node": {"hostname": HOST},
            "smtp": {"listen": ["127.0.0.1:0"], "spf": spf},
            "queue": {"url": f"sqlite:///{tmp_path}/queue.db"},
            "dns": {"nameservers": ["{}:{}".format(*dns_server.address)],
                    "timeout": f"{TIMEOUT}s"},
            "domains": {"verrotech.com": {}},
        })
        stored: list[NewMessage] = []

        async def submit(message: NewMessage) -> None:
            stored.append(message)

        check = SpfCheck(nameservers=config.dns.nameserver_addresses, timeout=TIMEOUT,
                         cache=new_cache(), receiver=HOST) if spf else None
        if check is not None:
            checks.append(check)
        ids = iter(f"ID{n:04d}" for n in range(1000))
        listeners = await start_listeners(config, submit, id_factory=lambda: next(ids),
                                          clock=FakeClock(), spf=check)
        running.append(listeners)
        return listeners.addresses[0][1], stored

    yield start
    for listeners in running:
        listeners.abort()
        await listeners.wait_closed()
    for check in checks:
        check.close()


@pytest.mark.parametrize(("sender", "helo", "result", "domain"), [
    ("ann@pass.example", "client.example", "pass", "pass.example"),
    ("ann@fail.example", "client.example", "fail", "fail.example"),
    ("ann@soft.example", "client.example", "softfail", "soft.example"),
    ("ann@neutral.example", "client.example", "neutral", "neutral.example"),
    ("ann@none.example", "client.example", "none", "none.example"),
    ("ann@nowhere.example", "client.example", "none", "nowhere.example"),  # NXDOMAIN
    ("ann@broken.example", "client.example", "permerror", "broken.example"),
    ("ann@MX.example", "client.example", "pass", "mx.example"),
    ("", "pass.example", "pass", "pass.example"),  # <>: the HELO name is checked
    ("", "fail.example", "fail", "fail.example"),
    ("ann@[192.0.2.1]", "client.example", "none", "[192.0.2.1]"),  # nothing to look up
])
async def test_each_result_is_stored_and_stated_in_authentication_results(
    relay: Start, sender: str, helo: str, result: str, domain: str,
) -> None:
    port, stored = await relay()
    session = await Session.open(port, helo)
    assert await session.send(sender) == "250 2.1.0 Ok"
    await session.close()
    [message] = stored
    assert message.spf == result
    header = f"Authentication-Results: {HOST}; spf={result} smtp.mailfrom={domain}\r\n"
    assert message.data.startswith(header.encode() + b"Received: from ")


async def test_a_name_server_that_never_answers_gives_temperror_within_the_timeout(
    relay: Start, dns_server: DnsServer,
) -> None:
    port, stored = await relay()
    session = await Session.open(port)
    started = time.monotonic()
    reply = await session.cmd("MAIL FROM:<ann@slow.example>")
    waited = time.monotonic() - started
    assert reply == "250 2.1.0 Ok"
    assert TIMEOUT * 0.9 <= waited < TIMEOUT + 0.4  # bounded by dns.timeout, not pyspf's 20 s
    assert ("slow.example", "TXT") in dns_server.queries
    assert (await session.cmd("RCPT TO:<bob@verrotech.com>")).startswith("250")
    assert (await session.cmd("DATA")).startswith("354")
    assert (await session.cmd("Subject: hi\r\n\r\nHello.\r\n.")).startswith("250")
    await session.close()
    [message] = stored
    assert message.spf == "temperror"
    assert b"; spf=temperror smtp.mailfrom=slow.example\r\n" in message.data


async def test_each_transaction_of_a_session_is_checked_for_its_own_sender(relay: Start) -> None:
    port, stored = await relay()
    session = await Session.open(port)
    await session.send("ann@fail.example")
    await session.send("ann@pass.example")
    assert (await session.cmd("MAIL FROM:<ann@soft.example>")).startswith("250")
    assert (await session.cmd("RSET")).startswith("250")
    await session.send("ann@neutral.example")
    await session.close()
    assert [m.spf for m in stored] == ["fail", "pass", "neutral"]


async def test_with_spf_off_nothing_is_looked_up_or_prepended(
    relay: Start, dns_server: DnsServer,
) -> None:
    port, stored = await relay(spf=False)
    session = await Session.open(port)
    await session.send("ann@fail.example")
    await session.close()
    [message] = stored
    assert message.spf is None
    assert message.data.startswith(b"Received: from ")
    assert dns_server.queries == []


async def test_a_reload_turns_spf_off_and_on_for_new_sessions(
    tmp_path: Path, dns_server: DnsServer, serving: Callable[[Served], Any],
    reloads: ReloadLog,
) -> None:
    add_spf_zone(dns_server)
    dns = {"nameservers": ["{}:{}".format(*dns_server.address)], "timeout": f"{TIMEOUT}s"}
    relay = await serving(Served(tmp_path, smtp={"spf": True}, dns=dns,
                                 domains={"verrotech.com": {}}))
    queue = Queue(db.connect(relay.settings["queue"]["url"]))
    name = relay.settings["node"]["hostname"]

    async def stored_from(sender: str) -> bytes:
        session = await Session.open(relay.port)
        await session.send(sender)
        await session.close()
        [view] = [v for v in queue.list() if v.sender == sender]
        data = queue.raw(view.id)
        assert data is not None
        return data

    assert (await stored_from("ann@fail.example")).startswith(
        f"Authentication-Results: {name}; spf=fail".encode())
    relay.rewrite(smtp={"spf": False})
    hangup()
    await reloads.wait_reloads(1)
    assert (await stored_from("bob@fail.example")).startswith(b"Received: ")
    assert [v.spf for v in queue.list() if v.sender == "bob@fail.example"] == [None]
    relay.rewrite(smtp={"spf": True})
    hangup()
    await reloads.wait_reloads(2)
    assert (await stored_from("cy@pass.example")).startswith(
        f"Authentication-Results: {name}; spf=pass".encode())
    queue.engine.dispose()
