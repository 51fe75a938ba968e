"""Next hops for a destination domain: MX lookup, ordering and loop avoidance.

Owns: turning a destination domain (or a configured `next_hop`) into the
ordered list of `Hop`s to try, with dnspython's async resolver, and
classifying every way that can fail as a `NoRoute` value (permanent: bounce;
temporary: defer) with a one-line reason and an RFC 3463 status.
Answers come from the TTL-honouring cache the caller passes
(`relay.core.dnscache`, shared with SPF), or from DNS afresh when none is given.
Refuses: connecting to anything, retries and backoff (the scheduler's),
keeping answers itself, IP-literal destination domains (``user@[192.0.2.1]``), DNSSEC, DANE.

Rules, as a careful Postfix operator running a backup MX expects:

* `next_hop` override, one of ``host``, ``host:port``, ``[host]``,
  ``[host]:port``, ``ip``, ``ip:port``, ``[ip]``, ``[ip]:port``,
  ``[ipv6]:port``: never an MX lookup.  An IP literal is used as is; a host
  name is resolved to its A then AAAA addresses (brackets or not: unlike
  Postfix, a bare ``host`` here does *not* mean "look up its MX").  The port
  defaults to `port` (``delivery.port``).  Loop avoidance does not apply: the
  operator said where to go.  A next_hop that does not resolve, even
  NXDOMAIN, defers (4.3.5): it is our configuration that is wrong, not the
  recipient, and deferring lets the operator fix it without bouncing mail.
* MX records are sorted by preference, equal preferences shuffled (with the
  injected `random.Random`); each MX host gives one `Hop` per address, A
  records before AAAA, host order kept, duplicate addresses dropped.  MX
  hosts that do not resolve are skipped; if none resolves: defer (4.4.3 when
  a lookup failed temporarily, 4.4.4 when they just have no addresses).
* Loop avoidance: the best (lowest) preference P of an MX host that is us
  (its name is `Identity.hostname`, case-insensitive, or one of its addresses
  is in `Identity.addresses`) drops that host and every MX with preference
  >= P.  Nothing left: defer, ``mail for <domain> loops back to myself``
  (4.4.6).  Only hosts more preferred than our name-matched entry are
  resolved.
* No MX records (NODATA): the domain itself is the mail exchanger at
  preference 0 (RFC 5321 5.1), loop avoidance included.  NODATA for MX, A
  and AAAA: bounce (5.4.4, "domain has no mail exchanger and no address"),
  as Postfix does for a domain that exists but cannot receive mail.
* Null MX (RFC 7505: a single MX whose exchange is ``.``): bounce, 5.1.10.
  A ``.`` exchange mixed with real ones is ignored and the rest are used.
* NXDOMAIN for the domain: bounce (5.1.2).  SERVFAIL, timeouts, refused,
  no usable nameserver: defer (4.4.3).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from relay.core.address import AddressError, parse_domain
from relay.core.dnscache import DnsSetupError, async_resolver
from relay.core.model import Hop

__all__ = ["DnsResolver", "Identity", "NoRoute", "Resolver", "Route", "parse_next_hop"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this node is, for MX loop avoidance."""

    hostname: str  # node.hostname
    addresses: frozenset[str]  # listen IPs + node.addresses, normalised IP strings


@dataclass(frozen=True, slots=True)
class Route:
    """Success: the hops to try, in order (never empty)."""

    hops: tuple[Hop, ...]


@dataclass(frozen=True, slots=True)
class NoRoute:
    """Failure as a value: why no hop can be tried now."""

    permanent: bool  # True: bounce; False: defer
    reason: str  # one line, for the log and last_error
    status: str  # RFC 3463 enhanced status code for the DSN


class Resolver(Protocol):
    """What delivery needs from name resolution."""

    async def route(self, domain: str, next_hop: str = "") -> Route | NoRoute: ...


# ------------------------------------------------------------------ next_hop


def parse_next_hop(value: str, default_port: int) -> tuple[str, int, bool]:
    """Split a next_hop into ``(host_or_ip, port, is_ip_literal)``.

    Raises ValueError on anything malformed (empty host, bad port, an
    unbracketed IPv6 address with a port, brackets around garbage).
    """
    text = value.strip()
    if not text:
        raise ValueError("empty next_hop")
    port_text = ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"unbalanced '[' in next_hop {value!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":") or rest == ":":
                raise ValueError(f"junk after ']' in next_hop {value!r}")
            port_text = rest[1:]
    elif text.count(":") > 1:
        host = text  # a bare IPv6 address, no port possible without brackets
    else:
        host, colon, port_text = text.partition(":")
        if colon and not port_text:
            raise ValueError(f"empty port in next_hop {value!r}")
    host = host.strip()
    if not host:
        raise ValueError(f"no host in next_hop {value!r}")
    port = default_port
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port in next_hop {value!r}")
        port = int(port_text)
    literal = _ip(host)
    if literal is not None:
        return literal, port, True
    if ":" in host:
        raise ValueError(f"bad address in next_hop {value!r}")
    try:
        return parse_domain(host).key, port, False  # an IDN host is looked up by A-label
    except AddressError as exc:
        raise ValueError(f"bad host in next_hop {value!r}: {exc}") from None


def _ip(text: str) -> str | None:
    """`text` as a normalised IP string, or None when it is not an IP literal."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _ips(texts: Iterable[str]) -> frozenset[str]:
    """The IP literals among `texts`, normalised."""
    return frozenset(a for a in map(_ip, texts) if a is not None)


# ------------------------------------------------------------------- lookups

_Kind = Literal["ok", "nxdomain", "nodata", "temporary"]


@dataclass(frozen=True, slots=True)
class _Lookup:
    kind: _Kind
    addresses: tuple[str, ...] = ()  # A/AAAA answers, normalised
    mx: tuple[tuple[int, dns.name.Name], ...] = ()  # MX answers
    error: str = ""  # one line when kind is "temporary"


@dataclass(frozen=True, slots=True)
class _Addresses:
    """A host's addresses, A then AAAA, and how its lookups went."""

    addresses: tuple[str, ...]
    nxdomain: bool  # the name does not exist
    temporary: str  # a temporary failure, "" when none


class DnsResolver:
    """`Resolver` over DNS, with dnspython's async resolver and `cache` (None: no cache)."""

    def __init__(
        self,
        *,
        nameservers: Sequence[tuple[str, int]],
        timeout: float,
        identity: Identity,
        port: int,
        rng: random.Random | None = None,
        cache: dns.resolver.LRUCache | None = None,
    ) -> None:
        self._nameservers = tuple(nameservers)
        self._cache = cache
        self._timeout = timeout
        self._port = port
        self._rng = rng if rng is not None else random.Random()
        self._own_addresses = _ips(identity.addresses)
        self._own_name = _absolute(identity.hostname)
        self._my_addresses = self._own_addresses
        self._my_names = frozenset({self._own_name})
        self._dns_error = ""
        self._dns: dns.asyncresolver.Resolver | None = self._make_resolver()

    def see_peers(self, hostnames: Iterable[str], addresses: Iterable[str]) -> None:
        """The nodes sharing our queue count as us for loop avoidance, so nodes of
        one cluster never relay to one another (refreshed with the heartbeat)."""
        self._my_names = frozenset({self._own_name, *(_absolute(h) for h in hostnames)})
        self._my_addresses = self._own_addresses | _ips(addresses)

    def _make_resolver(self) -> dns.asyncresolver.Resolver | None:
        try:
            return async_resolver(self._nameservers, self._timeout, self._cache)
        except DnsSetupError as exc:
            self._dns_error = f"no usable DNS configuration: {exc}"
            return None

    # ------------------------------------------------------------ public

    async def route(self, domain: str, next_hop: str = "") -> Route | NoRoute:
        """The hops for `domain` (or for `next_hop` when set), or why there are none."""
        if self._dns is None:
            self._dns = self._make_resolver()  # /etc/resolv.conf may be back
        if next_hop.strip():
            return await self._route_next_hop(next_hop)
        return await self._route_mx(domain)

    # --------------------------------------------------------- next_hop

    async def _route_next_hop(self, next_hop: str) -> Route | NoRoute:
        try:
            host, port, literal = parse_next_hop(next_hop, self._port)
        except ValueError as exc:
            return NoRoute(False, f"bad next_hop: {exc}", "4.3.5")
        if literal:
            return Route((Hop(host=host, address=host, port=port, preference=0),))
        name = _absolute(host)
        if name is None:
            return NoRoute(False, f"bad next_hop host {host!r}", "4.3.5")
        found = await self._addresses(name)
        if found.addresses:
            return Route(tuple(Hop(host, a, port, 0) for a in found.addresses))
        if found.temporary:
            return NoRoute(False, f"next_hop {host}: {found.temporary}", "4.4.3")
        what = "not found" if found.nxdomain else "has no address"
        return NoRoute(False, f"next_hop host {host} {what}", "4.3.5")

    # --------------------------------------------------------------- MX

    async def _route_mx(self, domain: str) -> Route | NoRoute:
        try:
            parsed = parse_domain(domain)  # either spelling: the lookup is by A-label
        except AddressError:
            parsed = None
        name = None if parsed is None or parsed.is_literal else _absolute(parsed.key)
        if parsed is None or name is None:
            return NoRoute(True, f"bad destination domain {domain!r}", "5.1.2")
        display = parsed.key
        mx = await self._query(name, dns.rdatatype.MX)
        if mx.kind == "nxdomain":
            return NoRoute(True, f"domain {display} not found (NXDOMAIN)", "5.1.2")
        if mx.kind == "temporary":
            return NoRoute(False, f"DNS lookup for {display} failed: {mx.error}", "4.4.3")
        if mx.kind == "nodata":
            return await self._route_implicit(display, name)

        real = [(pref, host) for pref, host in mx.mx if host != dns.name.root]
        if not real:
            return NoRoute(True, "domain does not accept mail (null MX)", "5.1.10")
        ordered = self._order(real)

        # Loop avoidance, part one: our own name marks our preference.
        mine = min(
            (pref for pref, host in ordered if host in self._my_names),
            default=None,
        )
        candidates = [(p, h) for p, h in ordered if mine is None or p < mine]
        found = await asyncio.gather(*(self._addresses(host) for _, host in candidates))
        # Part two: any host that resolves to one of our addresses does too.
        for (pref, _host), addresses in zip(candidates, found, strict=True):
            if self._my_addresses.intersection(addresses.addresses):
                mine = pref if mine is None else min(mine, pref)
        if mine is not None:
            kept = [(c, f) for c, f in zip(candidates, found, strict=True) if c[0] < mine]
            if not kept:
                return NoRoute(False, f"mail for {display} loops back to myself", "4.4.6")
        else:
            kept = list(zip(candidates, found, strict=True))
        return self._hops(display, kept)

    async def _route_implicit(self, display: str, name: dns.name.Name) -> Route | NoRoute:
        """No MX records: the domain itself, at preference 0 (RFC 5321 5.1)."""
        found = await self._addresses(name)
        if found.addresses:
            if name in self._my_names or self._my_addresses.intersection(found.addresses):
                return NoRoute(False, f"mail for {display} loops back to myself", "4.4.6")
            return Route(tuple(Hop(display, a, self._port, 0) for a in found.addresses))
        if found.temporary:
            return NoRoute(False, f"DNS lookup for {display} failed: {found.temporary}", "4.4.3")
        if found.nxdomain:  # the MX query said NODATA a moment ago: DNS is changing
            return NoRoute(False, f"domain {display} vanished during lookup", "4.4.3")
        return NoRoute(True, f"domain {display} has no mail exchanger and no address", "5.4.4")

    def _order(self, records: list[tuple[int, dns.name.Name]]) -> list[tuple[int, dns.name.Name]]:
        """By preference; equal preferences shuffled, deterministically per rng state."""
        by_pref: dict[int, list[dns.name.Name]] = {}
        for pref, host in sorted(set(records), key=lambda r: (r[0], r[1].to_text().lower())):
            by_pref.setdefault(pref, []).append(host)
        ordered: list[tuple[int, dns.name.Name]] = []
        for pref in sorted(by_pref):
            hosts = by_pref[pref]
            self._rng.shuffle(hosts)
            ordered.extend((pref, host) for host in hosts)
        return ordered

    def _hops(
        self, display: str, kept: list[tuple[tuple[int, dns.name.Name], _Addresses]]
    ) -> Route | NoRoute:
        hops: list[Hop] = []
        seen: set[str] = set()
        failures: list[str] = []
        for (pref, host), found in kept:
            host_text = _text(host)
            if found.temporary:
                failures.append(f"{host_text}: {found.temporary}")
            for address in found.addresses:
                if address not in seen:
                    seen.add(address)
                    hops.append(Hop(host_text, address, self._port, pref))
        if hops:
            return Route(tuple(hops))
        if failures:
            return NoRoute(
                False, f"no MX host of {display} resolved ({'; '.join(failures)})", "4.4.3"
            )
        return NoRoute(False, f"no MX host of {display} has an address", "4.4.4")

    # ---------------------------------------------------------- lookups

    async def _addresses(self, name: dns.name.Name) -> _Addresses:
        a, aaaa = await asyncio.gather(
            self._query(name, dns.rdatatype.A), self._query(name, dns.rdatatype.AAAA)
        )
        temporary = "; ".join(r.error for r in (a, aaaa) if r.kind == "temporary")
        return _Addresses(
            addresses=a.addresses + aaaa.addresses,
            nxdomain=a.kind == "nxdomain" or aaaa.kind == "nxdomain",
            temporary=temporary,
        )

    async def _query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        """One question, every failure classified; never raises (but cancels)."""
        resolver = self._dns
        what = dns.rdatatype.to_text(rdtype)
        if resolver is None:
            return _Lookup("temporary", error=self._dns_error or "no nameservers")
        try:
            answer = await resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return _Lookup("nxdomain")
        except dns.resolver.LifetimeTimeout:
            return _Lookup("temporary", error=f"{what} timed out after {self._timeout:g}s")
        except dns.resolver.NoNameservers as exc:
            return _Lookup("temporary", error=f"{what}: {_servers_said(exc)}")
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            return _Lookup("temporary", error=f"{what}: {_one_line(exc)}")
        if answer.rrset is None:
            return _Lookup("nodata")
        if rdtype == dns.rdatatype.MX:
            mx = tuple((rd.preference, rd.exchange) for rd in answer.rrset)
            return _Lookup("ok", mx=mx) if mx else _Lookup("nodata")
        addresses = tuple(dict.fromkeys(a for a in (_ip(rd.to_text()) for rd in answer.rrset) if a))
        return _Lookup("ok", addresses=addresses) if addresses else _Lookup("nodata")


def _absolute(text: str) -> dns.name.Name | None:
    try:
        return dns.name.from_text(text.strip().rstrip(".") + ".")
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return None


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _servers_said(exc: dns.resolver.NoNameservers) -> str:
    """SERVFAIL/REFUSED and friends, shortly: the rcodes every server gave."""
    said = []
    for error in exc.kwargs.get("errors") or []:
        # dnspython: (server, tcp, port, exception or rcode text, response)
        if isinstance(error, tuple) and len(error) >= 4:
            problem = error[3]
            what = _one_line(problem) if isinstance(problem, BaseException) else str(problem)
            said.append(f"{error[0]} said {what}")
    return "; ".join(said) or "no nameserver answered"
