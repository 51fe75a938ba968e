"""The process's DNS answers, kept as long as their TTL says, and resolvers that use them.

Owns: the one dnspython `LRUCache` shared by the async resolver of MX
lookups (`relay.delivery.resolver`) and the sync resolver SPF runs in worker
threads (`relay.smtp.spf`), so an SPF check and a delivery to the same domain
ask DNS once per TTL; and building either resolver on the `[dns]` name
servers (or /etc/resolv.conf) with one timeout for the whole lookup.
dnspython's cache is thread-safe, drops an answer once its TTL has passed
(a TTL of 0 is never reused), and keeps NXDOMAIN and NODATA answers for the
negative TTL of the zone's SOA.

Refuses: interpreting answers (the callers classify them), caching answers
longer than their TTL, and any cache of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

__all__ = ["CACHE_SIZE", "DnsSetupError", "async_resolver", "new_cache", "sync_resolver"]

_R = TypeVar("_R", bound=dns.resolver.BaseResolver)

CACHE_SIZE = 50_000  # answers; least recently used ones go first


class DnsSetupError(Exception):
    """No usable DNS configuration (no name servers given, and /etc/resolv.conf unusable)."""


def new_cache(size: int = CACHE_SIZE) -> dns.resolver.LRUCache:
    """A TTL-honouring answer cache to share between resolvers."""
    return dns.resolver.LRUCache(max_size=size)


def sync_resolver(nameservers: Sequence[tuple[str, int]], timeout: float,
                  cache: dns.resolver.LRUCache | None) -> dns.resolver.Resolver:
    """A blocking resolver, for worker threads; raises `DnsSetupError`."""
    return _build(dns.resolver.Resolver, nameservers, timeout, cache)


def async_resolver(nameservers: Sequence[tuple[str, int]], timeout: float,
                   cache: dns.resolver.LRUCache | None) -> dns.asyncresolver.Resolver:
    """An asyncio resolver, for the event loop; raises `DnsSetupError`."""
    return _build(dns.asyncresolver.Resolver, nameservers, timeout, cache)


def _build(
    kind: type[_R], nameservers: Sequence[tuple[str, int]], timeout: float,
    cache: dns.resolver.LRUCache | None,
) -> _R:
    """Either kind the same way: /etc/resolv.conf is read only when no servers are given."""
    try:
        resolver = kind(configure=not nameservers)
    except (dns.exception.DNSException, OSError) as exc:
        raise DnsSetupError(_one_line(exc)) from None
    if nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port)
                                for ip, port in nameservers]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = cache
    return resolver


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
