"""The shared DNS answer cache against the repo's DNS server: answers are
reused for exactly their TTL, a TTL of 0 never, and what an SPF check looked
up (in its worker thread) serves the MX lookup of a delivery on the loop.

dnspython's cache reads `time.time()` of `dns.resolver` (and a query's
lifetime that of `dns.asyncresolver` too); these tests move that clock
forward by an offset instead of waiting for a TTL to run out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import dns.asyncresolver
import dns.resolver
import pytest

from relay.core.dnscache import new_cache
from relay.delivery.resolver import DnsResolver, Identity, Route
from relay.smtp.spf import SpfCheck
from tests.support.dns_server import DnsServer

NOBODY = Identity("relay.elsewhere.example", frozenset({"198.51.100.99"}))


class Later:
    """`time.time()` plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> Later:
    clock = Later()
    for module in (dns.resolver, dns.asyncresolver):  # the lifetime of a query too
        monkeypatch.setattr(module, "time", SimpleNamespace(time=clock.time))
    return clock


@pytest.fixture
def cache() -> dns.resolver.LRUCache:
    return new_cache()


@pytest.fixture
def spf(dns_server: DnsServer, cache: dns.resolver.LRUCache,
        later: Later) -> Iterator[SpfCheck]:
    check = SpfCheck(nameservers=[dns_server.address], timeout=2.0, cache=cache,
                     receiver="relay.example", clock=later.time)
    yield check
    check.close()


def resolver(dns_server: DnsServer, cache: dns.resolver.LRUCache | None) -> DnsResolver:
    return DnsResolver(nameservers=[dns_server.address], timeout=2.0, identity=NOBODY,
                       port=25, cache=cache)


def addresses(route: object) -> list[str]:
    assert isinstance(route, Route), route
    return [hop.address for hop in route.hops]


def asked(dns_server: DnsServer, name: str, rdtype: str) -> int:
    return dns_server.queries.count((name, rdtype))


async def test_an_answer_is_reused_until_its_ttl_has_passed(
    dns_server: DnsServer, cache: dns.resolver.LRUCache, later: Later,
) -> None:
    dns_server.add("example.net", "MX", "10 mx.example.net.", ttl=60)
    dns_server.add("mx.example.net", "A", "192.0.2.1", ttl=60)
    mx = resolver(dns_server, cache)
    assert addresses(await mx.route("example.net")) == ["192.0.2.1"]
    dns_server.replace("mx.example.net", "A", "192.0.2.2", ttl=60)

    later.offset = 59
    assert addresses(await mx.route("example.net")) == ["192.0.2.1"]  # cached
    assert asked(dns_server, "mx.example.net", "A") == 1
    assert asked(dns_server, "example.net", "MX") == 1

    later.offset = 61
    assert addresses(await mx.route("example.net")) == ["192.0.2.2"]  # expired: asked again
    assert asked(dns_server, "mx.example.net", "A") == 2
    assert asked(dns_server, "example.net", "MX") == 2


async def test_a_ttl_of_zero_is_never_reused(
    dns_server: DnsServer, cache: dns.resolver.LRUCache,
) -> None:
    dns_server.add("example.net", "MX", "10 mx.example.net.", ttl=300)
    dns_server.add("mx.example.net", "A", "192.0.2.1", ttl=0)
    mx = resolver(dns_server, cache)
    assert addresses(await mx.route("example.net")) == ["192.0.2.1"]
    dns_server.replace("mx.example.net", "A", "192.0.2.2", ttl=0)
    assert addresses(await mx.route("example.net")) == ["192.0.2.2"]
    assert asked(dns_server, "mx.example.net", "A") == 2
    assert asked(dns_server, "example.net", "MX") == 1  # its TTL of 300 s holds


async def test_without_a_cache_every_route_asks_again(dns_server: DnsServer) -> None:
    dns_server.add("example.net", "MX", "10 mx.example.net.", ttl=300)
    dns_server.add("mx.example.net", "A", "192.0.2.1", ttl=300)
    mx = resolver(dns_server, None)
    await mx.route("example.net")
    await mx.route("example.net")
    assert asked(dns_server, "example.net", "MX") == 2


async def test_spf_checks_and_mx_lookups_share_the_cache(
    dns_server: DnsServer, cache: dns.resolver.LRUCache, spf: SpfCheck, later: Later,
) -> None:
    dns_server.add("sender.example", "TXT", '"v=spf1 mx -all"', ttl=300)
    dns_server.add("sender.example", "MX", "10 mx.sender.example.", ttl=300)
    dns_server.add("mx.sender.example", "A", "127.0.0.1", ttl=300)

    assert (await spf.check("127.0.0.1", "ann@sender.example", "client.example")).result == "pass"
    before = len(dns_server.queries)
    assert (await spf.check("127.0.0.1", "bob@sender.example", "client.example")).result == "pass"
    assert len(dns_server.queries) == before  # the second check asked nothing
    # a delivery to the sender (a DSN, say) reuses the MX and A answers; only
    # AAAA is new (SPF for an IPv4 client never asks it)
    assert addresses(await resolver(dns_server, cache).route("sender.example")) == ["127.0.0.1"]
    assert dns_server.queries[before:] == [("mx.sender.example", "AAAA")]
    assert asked(dns_server, "sender.example", "TXT") == 1

    dns_server.replace("sender.example", "TXT", '"v=spf1 -all"', ttl=300)
    later.offset = 301
    assert (await spf.check("127.0.0.1", "ann@sender.example", "client.example")).result == "fail"
    assert asked(dns_server, "sender.example", "TXT") == 2


async def test_the_event_loop_never_waits_for_dns(
    dns_server: DnsServer, cache: dns.resolver.LRUCache, spf: SpfCheck,
) -> None:
    """A check first tries the cache alone, on the loop: a miss stops that try
    before any question is sent; the worker thread asks, and fills the cache."""
    dns_server.add("sender.example", "TXT", '"v=spf1 a:out.sender.example -all"', ttl=300)
    dns_server.add("out.sender.example", "A", "127.0.0.1", ttl=300)
    args = ("127.0.0.1", "ann@sender.example", "client.example")
    assert spf._evaluate(*args, cache_only=True) is None
    assert dns_server.queries == []  # nothing was asked from the loop

    assert (await spf.check(*args)).result == "pass"  # asked in a worker thread
    asked_then = list(dns_server.queries)
    assert asked_then == [("sender.example", "TXT"), ("out.sender.example", "A")]
    found = spf._evaluate(*args, cache_only=True)  # all cached now
    assert found is not None and found[0] == "pass"
    assert 299 < found[1] - time.time() <= 300  # until the first answer expires
    assert spf._evaluate("127.0.0.1", "ann@nowhere.example", "x.example",
                         cache_only=True) is None
    assert dns_server.queries == asked_then
    assert (await spf.check("127.0.0.1", "ann@nowhere.example", "x.example")).result == "none"
    # a cached NXDOMAIN is answered from the cache too
    [(result, _until)] = [spf._evaluate("127.0.0.1", "ann@nowhere.example", "x.example",
                                        cache_only=True)]
    assert result == "none"


async def test_a_verdict_holds_until_the_first_answer_it_rests_on_expires(
    dns_server: DnsServer, spf: SpfCheck, later: Later,
) -> None:
    dns_server.add("sender.example", "TXT", '"v=spf1 a:out.sender.example -all"', ttl=600)
    dns_server.add("out.sender.example", "A", "127.0.0.1", ttl=60)
    args = ("127.0.0.1", "ann@sender.example", "client.example")
    assert (await spf.check(*args)).result == "pass"
    dns_server.replace("out.sender.example", "A", "192.0.2.1", ttl=60)
    later.offset = 59
    assert (await spf.check(*args)).result == "pass"  # as before: nothing asked
    assert (await spf.check("127.0.0.1", "bob@sender.example", "client.example")).result == (
        "pass")  # another sender: evaluated again, from the cache
    assert len(dns_server.queries) == 2
    later.offset = 61  # the A record's TTL has run out; the TXT record's has not
    assert (await spf.check(*args)).result == "fail"
    assert dns_server.queries[2:] == [("out.sender.example", "A")]
