"""DnsResolver against a real DNS server on 127.0.0.1 (tests/support/dns_server)."""

from __future__ import annotations

import random
import time

import pytest

from relay.core.model import Hop
from relay.delivery.resolver import DnsResolver, Identity, NoRoute, Route, parse_next_hop
from tests.support.dns_server import DnsServer

NOBODY = Identity("relay.elsewhere.example", frozenset({"198.51.100.99"}))
STAVROS = Identity("mail.verrotech.com", frozenset({"198.51.100.10"}))
HEKTOR = Identity("mail.verrotech.net", frozenset({"198.51.100.20"}))
NORWICH = Identity("mail.noc.verrotech.com", frozenset({"198.51.100.30"}))


def resolver(
    dns_server: DnsServer,
    identity: Identity = NOBODY,
    *,
    seed: int = 0,
    port: int = 25,
    timeout: float = 2.0,
) -> DnsResolver:
    return DnsResolver(
        nameservers=[dns_server.address],
        timeout=timeout,
        identity=identity,
        port=port,
        rng=random.Random(seed),
    )


def reference(dns_server: DnsServer) -> None:
    """The reference deployment of SPEC.md, on documentation addresses."""
    dns_server.add(
        "verrotech.com",
        "MX",
        "10 mail.verrotech.com.",
        "20 mail.verrotech.net.",
        "30 mail.noc.verrotech.com.",
    )
    dns_server.add("verrotech.com", "SOA", "ns1.verrotech.com. hostmaster.verrotech.com. 1 2 3 4 5")
    dns_server.add("mail.verrotech.com", "A", "192.0.2.10")
    dns_server.add("mail.verrotech.com", "AAAA", "2001:db8::10")
    dns_server.add("mail.verrotech.net", "A", "192.0.2.20")
    dns_server.add("mail.noc.verrotech.com", "A", "192.0.2.30")


def hops(result: Route | NoRoute) -> list[tuple[str, str, int, int]]:
    assert isinstance(result, Route), result
    return [(h.host, h.address, h.port, h.preference) for h in result.hops]


def no_route(result: Route | NoRoute) -> NoRoute:
    assert isinstance(result, NoRoute), result
    return result


# ----------------------------------------------------------------- ordering


async def test_mx_hosts_in_preference_order_every_address_a_then_aaaa(
    dns_server: DnsServer,
) -> None:
    reference(dns_server)
    result = await resolver(dns_server).route("verrotech.com")
    assert hops(result) == [
        ("mail.verrotech.com", "192.0.2.10", 25, 10),
        ("mail.verrotech.com", "2001:db8::10", 25, 10),
        ("mail.verrotech.net", "192.0.2.20", 25, 20),
        ("mail.noc.verrotech.com", "192.0.2.30", 25, 30),
    ]
    assert ("verrotech.com", "MX") in dns_server.queries


async def test_preference_order_does_not_depend_on_answer_order(dns_server: DnsServer) -> None:
    dns_server.add(
        "example.org", "MX", "30 c.example.org.", "5 a.example.org.", "20 b.example.org."
    )
    for host, ip in (("a", "192.0.2.1"), ("b", "192.0.2.2"), ("c", "192.0.2.3")):
        dns_server.add(f"{host}.example.org", "A", ip)
    result = await resolver(dns_server, port=2525).route("Example.ORG.")
    assert hops(result) == [
        ("a.example.org", "192.0.2.1", 2525, 5),
        ("b.example.org", "192.0.2.2", 2525, 20),
        ("c.example.org", "192.0.2.3", 2525, 30),
    ]


async def test_equal_preferences_are_shuffled_deterministically_per_seed(
    dns_server: DnsServer,
) -> None:
    dns_server.add(
        "example.org", "MX", "10 a.example.org.", "10 b.example.org.", "20 c.example.org."
    )
    for host, ip in (("a", "192.0.2.1"), ("b", "192.0.2.2"), ("c", "192.0.2.3")):
        dns_server.add(f"{host}.example.org", "A", ip)

    orders: set[tuple[str, ...]] = set()
    for seed in range(20):
        first = hops(await resolver(dns_server, seed=seed).route("example.org"))
        again = hops(await resolver(dns_server, seed=seed).route("example.org"))
        assert first == again  # same seed, same order
        hosts = tuple(h[0] for h in first)
        assert hosts[2] == "c.example.org"  # never shuffled across preferences
        orders.add(hosts[:2])
    assert orders == {("a.example.org", "b.example.org"), ("b.example.org", "a.example.org")}


async def test_several_addresses_per_host_give_several_hops(dns_server: DnsServer) -> None:
    dns_server.add("example.org", "MX", "10 mx.example.org.")
    dns_server.add("mx.example.org", "A", "192.0.2.1", "192.0.2.2", "192.0.2.3")
    dns_server.add("mx.example.org", "AAAA", "2001:db8::1", "2001:db8::2")
    result = hops(await resolver(dns_server).route("example.org"))
    assert [h[0] for h in result] == ["mx.example.org"] * 5
    assert {h[1] for h in result[:3]} == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
    assert {h[1] for h in result[3:]} == {"2001:db8::1", "2001:db8::2"}


async def test_answer_too_big_for_udp_is_fetched_over_tcp(dns_server: DnsServer) -> None:
    many = [f"192.0.2.{i}" for i in range(1, 81)]  # > 512 octets: truncated over UDP
    dns_server.add("example.org", "MX", "10 mx.example.org.")
    dns_server.add("mx.example.org", "A", *many)
    result = hops(await resolver(dns_server).route("example.org"))
    assert sorted(h[1] for h in result) == sorted(many)
    assert dns_server.queries.count(("mx.example.org", "A")) == 2  # UDP (TC=1), then TCP


async def test_shared_addresses_are_tried_once(dns_server: DnsServer) -> None:
    dns_server.add("example.org", "MX", "10 a.example.org.", "20 b.example.org.")
    dns_server.add("a.example.org", "A", "192.0.2.1")
    dns_server.add("b.example.org", "A", "192.0.2.1", "192.0.2.2")
    result = await resolver(dns_server).route("example.org")
    assert hops(result) == [
        ("a.example.org", "192.0.2.1", 25, 10),
        ("b.example.org", "192.0.2.2", 25, 20),
    ]


async def test_records_are_read_afresh_on_every_call(dns_server: DnsServer) -> None:
    reference(dns_server)
    r = resolver(dns_server, HEKTOR)
    assert [h[0] for h in hops(await r.route("verrotech.com"))] == ["mail.verrotech.com"] * 2
    dns_server.replace("mail.verrotech.com", "A", "192.0.2.11")
    dns_server.remove("mail.verrotech.com", "AAAA")
    assert hops(await r.route("verrotech.com")) == [("mail.verrotech.com", "192.0.2.11", 25, 10)]


# ----------------------------------------------------------- loop avoidance


async def test_hektor_keeps_only_the_primary(dns_server: DnsServer) -> None:
    reference(dns_server)
    result = await resolver(dns_server, HEKTOR).route("verrotech.com")
    assert hops(result) == [
        ("mail.verrotech.com", "192.0.2.10", 25, 10),
        ("mail.verrotech.com", "2001:db8::10", 25, 10),
    ]


async def test_norwich_keeps_the_primary_and_hektor(dns_server: DnsServer) -> None:
    reference(dns_server)
    result = await resolver(dns_server, NORWICH).route("verrotech.com")
    assert [h[0] for h in hops(result)] == [
        "mail.verrotech.com",
        "mail.verrotech.com",
        "mail.verrotech.net",
    ]


async def test_best_mx_loops_back_to_myself(dns_server: DnsServer) -> None:
    reference(dns_server)
    result = no_route(await resolver(dns_server, STAVROS).route("verrotech.com"))
    assert result == NoRoute(
        permanent=False, reason="mail for verrotech.com loops back to myself", status="4.4.6"
    )


async def test_own_name_matches_whatever_its_case_and_final_dot(dns_server: DnsServer) -> None:
    reference(dns_server)
    me = Identity("MAIL.VerroTech.NET.", frozenset())
    result = await resolver(dns_server, me).route("verrotech.com")
    assert {h[0] for h in hops(result)} == {"mail.verrotech.com"}


async def test_identity_matched_by_address_only(dns_server: DnsServer) -> None:
    reference(dns_server)
    me = Identity("relay.internal.example", frozenset({"192.0.2.20"}))  # Hektor's address
    result = await resolver(dns_server, me).route("verrotech.com")
    assert {h[0] for h in hops(result)} == {"mail.verrotech.com"}


async def test_nodes_sharing_our_queue_count_as_us(dns_server: DnsServer) -> None:
    """Norwich shares Hektor's queue: Hektor's name (or address) is Norwich's
    own, so it keeps only the primary; peers heard of later replace earlier ones."""
    reference(dns_server)
    norwich = resolver(dns_server, NORWICH)
    norwich.see_peers({"mail.verrotech.net"}, set())
    assert {h[0] for h in hops(await norwich.route("verrotech.com"))} == {"mail.verrotech.com"}
    norwich.see_peers(set(), {"192.0.2.20"})  # Hektor by its address only
    assert {h[0] for h in hops(await norwich.route("verrotech.com"))} == {"mail.verrotech.com"}
    norwich.see_peers(set(), set())  # Hektor left the cluster
    assert "mail.verrotech.net" in {h[0] for h in hops(await norwich.route("verrotech.com"))}


async def test_identity_matched_by_ipv6_address_of_the_best_mx(dns_server: DnsServer) -> None:
    reference(dns_server)
    me = Identity("relay.internal.example", frozenset({"2001:db8::10"}))
    result = no_route(await resolver(dns_server, me).route("verrotech.com"))
    assert result.reason == "mail for verrotech.com loops back to myself"
    assert not result.permanent


async def test_mx_of_our_preference_is_dropped_with_us(dns_server: DnsServer) -> None:
    dns_server.add(
        "example.org", "MX", "10 a.example.org.", "20 mail.verrotech.net.", "20 b.example.org."
    )
    dns_server.add("a.example.org", "A", "192.0.2.1")
    dns_server.add("b.example.org", "A", "192.0.2.2")
    result = await resolver(dns_server, HEKTOR).route("example.org")
    assert hops(result) == [("a.example.org", "192.0.2.1", 25, 10)]


async def test_hosts_less_preferred_than_our_name_are_not_even_looked_up(
    dns_server: DnsServer,
) -> None:
    reference(dns_server)
    await resolver(dns_server, HEKTOR).route("verrotech.com")
    looked_up = {name for name, _ in dns_server.queries}
    assert "mail.verrotech.com" in looked_up
    assert "mail.noc.verrotech.com" not in looked_up


# ------------------------------------------------------ implicit and null MX


async def test_no_mx_means_the_domain_itself_at_preference_zero(dns_server: DnsServer) -> None:
    dns_server.add("example.org", "A", "192.0.2.1")
    dns_server.add("example.org", "AAAA", "2001:db8::1")
    result = await resolver(dns_server).route("example.org")
    assert hops(result) == [
        ("example.org", "192.0.2.1", 25, 0),
        ("example.org", "2001:db8::1", 25, 0),
    ]


async def test_implicit_mx_that_is_us_loops(dns_server: DnsServer) -> None:
    dns_server.add("example.org", "A", "198.51.100.20")
    result = no_route(await resolver(dns_server, HEKTOR).route("example.org"))
    assert result.reason == "mail for example.org loops back to myself"
    assert (result.permanent, result.status) == (False, "4.4.6")


async def test_no_mx_and_no_address_bounces(dns_server: DnsServer) -> None:
    dns_server.add("example.org", "TXT", '"v=spf1 -all"')
    result = no_route(await resolver(dns_server).route("example.org"))
    assert (result.permanent, result.status) == (True, "5.4.4")
    assert "no mail exchanger" in result.reason


async def test_null_mx_bounces(dns_server: DnsServer) -> None:
    dns_server.add("example.org", "MX", "0 .")
    dns_server.add("example.org", "A", "192.0.2.1")  # must not be used as implicit MX
    result = no_route(await resolver(dns_server).route("example.org"))
    assert result == NoRoute(
        permanent=True, reason="domain does not accept mail (null MX)", status="5.1.10"
    )


# ------------------------------------------------------------------ failures


async def test_nxdomain_bounces(dns_server: DnsServer) -> None:
    reference(dns_server)
    result = no_route(await resolver(dns_server).route("verrotech.invalid"))
    assert (result.permanent, result.status) == (True, "5.1.2")
    assert "verrotech.invalid" in result.reason


async def test_nxdomain_under_a_zone_with_soa_bounces(dns_server: DnsServer) -> None:
    reference(dns_server)
    result = no_route(await resolver(dns_server).route("nosuch.verrotech.com"))
    assert (result.permanent, result.status) == (True, "5.1.2")


async def test_servfail_defers(dns_server: DnsServer) -> None:
    reference(dns_server)
    dns_server.servfail("verrotech.com")
    result = no_route(await resolver(dns_server).route("verrotech.com"))
    assert (result.permanent, result.status) == (False, "4.4.3")
    assert "SERVFAIL" in result.reason
    dns_server.heal("verrotech.com")
    assert isinstance(await resolver(dns_server).route("verrotech.com"), Route)


async def test_timeout_defers_within_the_timeout(dns_server: DnsServer) -> None:
    reference(dns_server)
    dns_server.drop("verrotech.com")
    started = time.monotonic()
    result = no_route(await resolver(dns_server, timeout=0.3).route("verrotech.com"))
    elapsed = time.monotonic() - started
    assert (result.permanent, result.status) == (False, "4.4.3")
    assert "timed out" in result.reason
    assert elapsed < 3.0
    assert ("verrotech.com", "MX") in dns_server.queries


async def test_unresolvable_mx_hosts_are_skipped(dns_server: DnsServer) -> None:
    dns_server.add(
        "example.org", "MX", "10 gone.example.org.", "20 sick.example.org.", "30 ok.example.org."
    )
    dns_server.add("sick.example.org", "A", "192.0.2.2")
    dns_server.servfail("sick.example.org")
    dns_server.add("ok.example.org", "A", "192.0.2.3")
    result = await resolver(dns_server).route("example.org")
    assert hops(result) == [("ok.example.org", "192.0.2.3", 25, 30)]


async def test_no_mx_host_resolves_defers(dns_server: DnsServer) -> None:
    dns_server.add("example.org", "MX", "10 gone.example.org.", "20 gone.example.net.")
    result = no_route(await resolver(dns_server).route("example.org"))
    assert (result.permanent, result.status) == (False, "4.4.4")


async def test_mx_host_lookup_failure_defers_with_dns_status(dns_server: DnsServer) -> None:
    dns_server.add("example.org", "MX", "10 sick.example.org.")
    dns_server.add("sick.example.org", "A", "192.0.2.2")
    dns_server.drop("sick.example.org")
    result = no_route(await resolver(dns_server, timeout=0.3).route("example.org"))
    assert (result.permanent, result.status) == (False, "4.4.3")
    assert "sick.example.org" in result.reason


async def test_unreachable_nameserver_defers(dns_server: DnsServer) -> None:
    address = dns_server.address
    dns_server.stop()  # nothing listens there now: ICMP refused or silence
    r = DnsResolver(nameservers=[address], timeout=0.3, identity=NOBODY, port=25)
    result = no_route(await r.route("verrotech.com"))
    assert (result.permanent, result.status) == (False, "4.4.3")


# ------------------------------------------------------------------ next_hop


@pytest.mark.parametrize(
    ("next_hop", "expected"),
    [
        ("[192.0.2.7]:2526", Hop("192.0.2.7", "192.0.2.7", 2526, 0)),
        ("[192.0.2.7]", Hop("192.0.2.7", "192.0.2.7", 2500, 0)),
        ("192.0.2.7:26", Hop("192.0.2.7", "192.0.2.7", 26, 0)),
        ("192.0.2.7", Hop("192.0.2.7", "192.0.2.7", 2500, 0)),
        ("[::1]:2525", Hop("::1", "::1", 2525, 0)),
        ("[2001:DB8:0::7]", Hop("2001:db8::7", "2001:db8::7", 2500, 0)),
        ("2001:db8::7", Hop("2001:db8::7", "2001:db8::7", 2500, 0)),
    ],
)
async def test_next_hop_ip_literal_is_used_as_is(
    dns_server: DnsServer, next_hop: str, expected: Hop
) -> None:
    reference(dns_server)
    result = await resolver(dns_server, port=2500).route("verrotech.com", next_hop)
    assert result == Route((expected,))
    assert dns_server.queries == []  # no DNS at all


@pytest.mark.parametrize(
    ("next_hop", "port"),
    [
        ("relay.verrotech.com", 2500),
        ("relay.verrotech.com:2526", 2526),
        ("[relay.verrotech.com]", 2500),
        ("[Relay.Verrotech.COM.]:2526", 2526),
    ],
)
async def test_next_hop_host_is_resolved_without_mx_lookup(
    dns_server: DnsServer, next_hop: str, port: int
) -> None:
    reference(dns_server)
    dns_server.add("relay.verrotech.com", "MX", "10 mail.verrotech.com.")  # must be ignored
    dns_server.add("relay.verrotech.com", "A", "192.0.2.40", "192.0.2.41")
    dns_server.add("relay.verrotech.com", "AAAA", "2001:db8::40")
    result = await resolver(dns_server, port=2500).route("verrotech.com", next_hop)
    assert sorted(hops(result)) == sorted(
        [
            ("relay.verrotech.com", "192.0.2.40", port, 0),
            ("relay.verrotech.com", "192.0.2.41", port, 0),
            ("relay.verrotech.com", "2001:db8::40", port, 0),
        ]
    )
    assert hops(result)[-1][1] == "2001:db8::40"  # A before AAAA
    assert {t for _, t in dns_server.queries} == {"A", "AAAA"}


async def test_next_hop_skips_loop_avoidance(dns_server: DnsServer) -> None:
    reference(dns_server)
    result = await resolver(dns_server, STAVROS).route("verrotech.com", "mail.verrotech.com:25")
    assert hops(result)[0] == ("mail.verrotech.com", "192.0.2.10", 25, 0)
    literal = await resolver(dns_server, STAVROS).route("verrotech.com", "[198.51.100.10]")
    assert hops(literal) == [("198.51.100.10", "198.51.100.10", 25, 0)]


async def test_next_hop_that_does_not_resolve_defers(dns_server: DnsServer) -> None:
    reference(dns_server)
    result = no_route(await resolver(dns_server).route("verrotech.com", "typo.verrotech.com"))
    assert (result.permanent, result.status) == (False, "4.3.5")
    assert "typo.verrotech.com" in result.reason


async def test_next_hop_lookup_failure_defers(dns_server: DnsServer) -> None:
    dns_server.add("relay.verrotech.com", "A", "192.0.2.40")
    dns_server.servfail("relay.verrotech.com")
    result = no_route(await resolver(dns_server).route("verrotech.com", "relay.verrotech.com"))
    assert (result.permanent, result.status) == (False, "4.4.3")


@pytest.mark.parametrize(
    "bad",
    [
        "host:",
        "host:0",
        "host:65536",
        "host:smtp",
        "[::1",
        "[::1]x",
        "[]",
        ":25",
        "[]:25",
        "[::1]:",
    ],
)
async def test_malformed_next_hop_defers_as_configuration_error(
    dns_server: DnsServer, bad: str
) -> None:
    result = no_route(await resolver(dns_server).route("verrotech.com", bad))
    assert (result.permanent, result.status) == (False, "4.3.5")
    assert dns_server.queries == []


def test_parse_next_hop() -> None:
    assert parse_next_hop("[::1]:2525", 25) == ("::1", 2525, True)
    assert parse_next_hop(" Mail.Example.ORG. ", 25) == ("mail.example.org", 25, False)
    assert parse_next_hop("MX.Bücher.test:2525", 25) == ("mx.xn--bcher-kva.test", 2525, False)
    with pytest.raises(ValueError, match=r"bad host in next_hop 'mx\.\.example': .*empty label"):
        parse_next_hop("mx..example", 25)
    with pytest.raises(ValueError):
        parse_next_hop("", 25)
