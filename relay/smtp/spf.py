"""SPF (RFC 7208) at MAIL FROM: the client's IP against the sender's domain.

Owns: running pyspf, the reference implementation, with its DNS lookups
answered by dnspython on our `[dns]` name servers through the process's
shared, TTL-honouring cache (`relay.core.dnscache`); bounding the whole check
by `dns.timeout` (past it the result is `temperror` and the reply is not
delayed further); the seven RFC 7208 result names; and the
`Authentication-Results:` header (RFC 8601) prepended to the message.

Where it runs: a verdict is remembered for the same (client IP, sender, HELO)
until the first DNS answer it rested on expires, so a sender's next message
costs a dictionary lookup. Otherwise the check runs first on the event loop
with the DNS cache alone (no I/O at all: a lookup the cache cannot answer
stops that try), in some tens of microseconds; when something must be asked,
the whole check runs again in a small pool of worker threads, where lookups
may block. Handing every check to a thread costs more than the check: in a
busy relay the worker waits for the GIL behind the loop (up to the 5 ms
switch interval), and `bench/compare.py --verify-spf` measured accept at
0.5-0.8x that way.

The identity checked is the envelope sender's domain, or the HELO name for
the null sender `<>`. What cannot be checked gives `none` without a lookup:
a client that is not an IP, an address literal or a dotless name as domain.

Refuses: acting on the result (the relay accepts whatever SPF says; only
`bounces.send_to` consults it, in `relay.delivery.outcomes`), DKIM, DMARC,
and using the `exp=` explanation (nobody reads it at a backup MX).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import spf as pyspf

from relay.core.address import AddressError, parse_domain
from relay.core.dnscache import DnsSetupError, sync_resolver

__all__ = ["RESULTS", "SpfCheck", "SpfVerdict", "authentication_results", "checked",
           "identity", "prepended", "result_name"]

log = logging.getLogger("relay.smtp.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_OLD_NAMES = {"error": "temperror", "unknown": "permerror", "ambiguous": "permerror"}
WORKERS = 4  # threads for checks that must ask DNS
VERDICTS = 10_000  # verdicts remembered (each until a DNS answer it rests on expires)


def result_name(raw: object) -> str:
    """pyspf's result as one of the seven RFC 7208 names; anything else (a
    pre-RFC name, a value from a newer pyspf we do not know) as the nearest one,
    `permerror` when there is none."""
    text = str(raw).strip().lower()
    if text in RESULTS:
        return text
    return _OLD_NAMES.get(text, "permerror")


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    """One MAIL FROM's SPF result and the domain it is for."""

    result: str  # one of RESULTS
    domain: str  # as in smtp.mailfrom=: A-label, lower case; the HELO name for <>


def authentication_results(hostname: str, verdict: SpfVerdict) -> bytes:
    """`Authentication-Results: <hostname>; spf=<result> smtp.mailfrom=<domain>`, CRLF-ended."""
    domain = verdict.domain or "unknown"
    return (f"Authentication-Results: {hostname}; spf={verdict.result} "
            f"smtp.mailfrom={domain}\r\n").encode("ascii", "replace")


def prepended(hostname: str, verdict: SpfVerdict | None) -> bytes:
    """What goes above our Received header: the verdict's header, or nothing with SPF off."""
    return b"" if verdict is None else authentication_results(hostname, verdict)


async def checked(check: SpfCheck | None, client_ip: str, sender: str,
                  helo: str | None) -> SpfVerdict | None:
    """The session's hook at MAIL FROM: the verdict, or None with SPF off."""
    if check is None:
        return None
    return await check.check(client_ip, sender, helo or "")


def identity(sender: str, helo: str) -> tuple[str, str] | None:
    """(sender pyspf checks, domain for the header), or None when nothing can be checked."""
    local, at, domain = sender.rpartition("@")
    if not at:
        local, domain = "postmaster", helo  # <>: the HELO identity (RFC 7208 2.3)
    try:
        parsed = parse_domain(domain.strip().rstrip("."))
    except AddressError:
        return None
    if parsed.is_literal or "." not in parsed.key:
        return None
    if not local.isascii() or not local or '"' in local:
        local = "postmaster"  # only %{l} macros see it, and they want ASCII
    return f"{local}@{parsed.key}", parsed.key


class SpfCheck:
    """SPF checks for every session, on one set of name servers and one cache."""

    def __init__(self, *, nameservers: Sequence[tuple[str, int]], timeout: float,
                 cache: dns.resolver.LRUCache | None, receiver: str,
                 workers: int = WORKERS, clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self._receiver = receiver
        self._clock = clock  # the cache's clock: time.time, as dnspython's
        # (ip, sender, helo) -> (result, until): the same question over the same
        # DNS answers has the same verdict, until the first of those answers expires
        self._verdicts: collections.OrderedDict[tuple[str, str, str], tuple[str, float]] = (
            collections.OrderedDict())
        try:
            self._resolver: dns.resolver.Resolver | None = sync_resolver(
                nameservers, timeout, cache)
        except DnsSetupError as exc:
            log.warning("SPF: no usable DNS configuration (%s); every result is temperror", exc)
            self._resolver = None
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "relay-spf")

    def close(self) -> None:
        """Stop the worker threads (a check still running finishes on its own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def check(self, client_ip: str, sender: str, helo: str) -> SpfVerdict:
        """The SPF result for this MAIL FROM, within `timeout` seconds."""
        found = identity(sender, helo)
        if found is None:
            return SpfVerdict("none", _domain_text(sender, helo))
        checked, domain = found
        try:
            ip = str(ipaddress.ip_address(client_ip))
        except ValueError:
            return SpfVerdict("none", domain)
        if self._resolver is None:
            return SpfVerdict("temperror", domain)
        key = (ip, checked, helo)
        known = self._verdicts.get(key)
        if known is not None and known[1] > self._clock():
            return SpfVerdict(known[0], domain)
        found_in_cache = self._evaluate(ip, checked, helo, cache_only=True)
        if found_in_cache is not None:
            return SpfVerdict(self._keep(key, *found_in_cache), domain)
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._pool, self._evaluate, ip, checked, helo)
        expired: list[bool] = []  # a timer, not asyncio.wait_for: cheaper, and this is per MAIL

        def expire() -> None:
            expired.append(True)
            work.cancel()

        timer = loop.call_later(self.timeout, expire)
        try:
            asked = await work
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not expired or (task is not None and task.cancelling()):
                raise  # the session's own cancellation
            return SpfVerdict("temperror", domain)
        finally:
            timer.cancel()
        return SpfVerdict(self._keep(key, *asked) if asked is not None else "temperror", domain)

    def _keep(self, key: tuple[str, str, str], raw: str, until: float) -> str:
        """The verdict's name, remembered until `until` (when a DNS answer it
        rests on expires; 0: not at all, e.g. a temperror)."""
        result = result_name(raw)
        if result != "temperror" and until > self._clock():
            self._verdicts[key] = (result, until)
            self._verdicts.move_to_end(key)
            if len(self._verdicts) > VERDICTS:
                self._verdicts.popitem(last=False)
        return result

    def _evaluate(self, ip: str, sender: str, helo: str,
                  cache_only: bool = False) -> tuple[str, float] | None:
        """pyspf's verdict and until when the DNS answers it used hold, its
        lookups through our resolver: in a worker thread, or (`cache_only`) on
        the loop, where None means "needs DNS, not cached"."""
        _local.resolver = self._resolver
        _local.cache_only = cache_only
        _local.expires = float("inf")
        try:
            query = pyspf.query(i=ip, s=sender, h=helo or "unknown", receiver=self._receiver,
                                timeout=self.timeout, querytime=self.timeout)
            result, _code, _explanation = query.check()
            return str(result), _local.expires
        except _NotCached:
            return None
        except Exception as exc:  # pyspf's own failure: our problem, not the sender's
            log.warning("SPF check of %s from %s failed: %s", sender, ip, exc)
            return "temperror", 0.0
        finally:
            _local.resolver = None
            _local.cache_only = False


def _domain_text(sender: str, helo: str) -> str:
    domain = sender.rpartition("@")[2] if "@" in sender else helo
    return "".join(c for c in domain if c.isascii() and c.isprintable() and c not in " ;")


# pyspf looks names up through its module-level `DNSLookup`; ours answers with
# the resolver of the check running in this thread (from its cache alone when
# `cache_only`: on the event loop).
_local = threading.local()


class _NotCached(Exception):
    """A cache-only check needs an answer the cache does not have."""


def _lookup(name: str, qtype: str, strict: object = True,
            timeout: float = 5.0) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNS hook: [((name, type), value)]; empty for NXDOMAIN or NODATA,
    `pyspf.TempError` for a lookup that failed or timed out."""
    resolver: dns.resolver.Resolver | None = getattr(_local, "resolver", None)
    if resolver is None:
        raise pyspf.TempError("DNS: no resolver for this thread")
    answer = _cached(resolver, name, qtype)
    if answer is None:
        if getattr(_local, "cache_only", False):
            raise _NotCached(name, qtype)
        try:
            answer = resolver.resolve(name, qtype, search=False, raise_on_no_answer=False,
                                      lifetime=max(0.01, min(float(timeout), resolver.lifetime)))
        except dns.resolver.NXDOMAIN:
            _local.expires = 0.0  # how long it holds is not told: the verdict is not kept
            return []
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            _local.expires = 0.0
            raise pyspf.TempError(f"DNS {' '.join(str(exc).split())}") from None
    _local.expires = min(getattr(_local, "expires", 0.0), answer.expiration)
    if answer.rrset is None:  # NODATA, or a cached NXDOMAIN
        return []
    key = (name, qtype)
    out: list[tuple[tuple[str, str], Any]] = []
    for rdata in answer.rrset:
        if answer.rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            out.append((key, rdata.address))
        elif answer.rrset.rdtype == dns.rdatatype.MX:
            out.append((key, (rdata.preference, rdata.exchange)))
        elif answer.rrset.rdtype == dns.rdatatype.PTR:
            out.append((key, rdata.target.to_text(True)))
        elif answer.rrset.rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
            out.append((key, rdata.strings))
    return out


def _cached(resolver: dns.resolver.Resolver, name: str,
            qtype: str) -> dns.resolver.Answer | None:
    """The cache's answer, unexpired, without a `resolve()` round (a warm cache
    answers every lookup of a busy sender's check), a cached NXDOMAIN included
    (dnspython keeps those under the type ANY); None: not cached."""
    cache = resolver.cache
    if cache is None:
        return None
    try:
        qname = _names(name)
        answer = cache.get((qname, dns.rdatatype.from_text(qtype), dns.rdataclass.IN))
    except (dns.exception.DNSException, ValueError):
        return None
    if answer is not None:
        return answer
    missing = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
    if missing is not None and missing.response.rcode() == dns.rcode.NXDOMAIN:
        return missing  # its rrset is None: no records
    return None


@functools.lru_cache(maxsize=4096)
def _names(name: str) -> dns.name.Name:
    """`name` as an absolute name; parsing one is not free and senders repeat."""
    return dns.name.from_text(name)


pyspf.DNSLookup = _lookup
