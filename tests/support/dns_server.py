"""A real authoritative DNS server on loopback, for tests.

Owns: answering UDP and TCP queries on 127.0.0.1 (one ephemeral port for
both) from an in-memory record set that tests edit while it runs, failure
injection per name (SERVFAIL, or no answer at all so the client times out),
and a log of the questions it was asked.  It runs its own asyncio loop in a
background thread, so it serves both in-process async code and a relay
started as a subprocess.

Refuses: recursion, zone transfers, DNSSEC, wildcards, classes other than IN.

Semantics, close enough to a real authoritative server for resolver tests:

* a name that has no records and no descendants with records: NXDOMAIN;
* a name that exists (or is an empty non-terminal) but lacks the asked
  type: NOERROR with an empty answer (NODATA), plus the SOA of the closest
  enclosing name that has one, if any, in the authority section;
* CNAMEs are followed inside the record set (up to 8 links);
* a UDP answer larger than the client's payload (512 octets without EDNS)
  is sent truncated (TC=1, empty answer) so the client retries over TCP.

Run standalone::

    python -m tests.support.dns_server --port 5353 --zone zone.json

where zone.json maps names to types to rdata strings, e.g.
``{"verrotech.com": {"MX": ["10 mail.verrotech.com."]},
"mail.verrotech.com": {"A": "127.0.0.1"}, "$servfail": [], "$drop": []}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import signal
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

HOST = "127.0.0.1"
_MAX_CNAME_CHAIN = 8


def _name(name: str | dns.name.Name) -> dns.name.Name:
    """An absolute name from `name`; relative text is taken as absolute."""
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    return dns.name.from_text(name, origin=dns.name.root)


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower() if name != dns.name.root else "."


class DnsServer:
    """An authoritative DNS server on 127.0.0.1 whose data tests change live.

    Start it with `start()` (or use it as a context manager); `address` is
    then ``("127.0.0.1", port)``, serving UDP and TCP on that port.
    """

    def __init__(self, host: str = HOST, port: int = 0) -> None:
        self._host = host
        self._want_port = port
        self._lock = threading.Lock()
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._servfail: set[dns.name.Name] = set()
        self._drop: set[dns.name.Name] = set()
        self.queries: list[tuple[str, str]] = []  # (name without final dot, lowercase; "MX")
        self.address: tuple[str, int] = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Transport] = set()

    # ----------------------------------------------------------- record set

    def add(self, name: str, rdtype: str, *rdata: str, ttl: int = 60) -> None:
        """Add records, e.g. ``add("verrotech.com", "MX", "10 mail.verrotech.com.")``.

        Names in rdata without a final dot are taken as absolute.  Adding to
        an existing RRset keeps its records (the TTL becomes `ttl`).  With no
        rdata the name is only made to exist, so every type answers NODATA.
        """
        owner = _name(name)
        kind = dns.rdatatype.from_text(rdtype)
        parsed = [
            dns.rdata.from_text(
                dns.rdataclass.IN, kind, text, origin=dns.name.root, relativize=False
            )
            for text in rdata
        ]
        with self._lock:
            node = self._records.setdefault(owner, {})
            if not parsed:
                return
            rrset = node.get(kind)
            if rrset is None:
                rrset = node[kind] = dns.rrset.RRset(owner, dns.rdataclass.IN, kind)
            for item in parsed:
                rrset.add(item)
            rrset.ttl = ttl

    def replace(self, name: str, rdtype: str, *rdata: str, ttl: int = 60) -> None:
        """Make `rdata` the only records of `rdtype` at `name`."""
        self.remove(name, rdtype)
        self.add(name, rdtype, *rdata, ttl=ttl)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove one type at `name`, or (no type) the name and its failure mode."""
        owner = _name(name)
        with self._lock:
            if rdtype is None:
                self._records.pop(owner, None)
                self._servfail.discard(owner)
                self._drop.discard(owner)
                return
            node = self._records.get(owner)
            if node is not None:
                node.pop(dns.rdatatype.from_text(rdtype), None)

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL to every question about `name` until `heal(name)`."""
        with self._lock:
            self._servfail.add(_name(name))
            self._drop.discard(_name(name))

    def drop(self, name: str) -> None:
        """Never answer questions about `name` (clients time out) until `heal(name)`."""
        with self._lock:
            self._drop.add(_name(name))
            self._servfail.discard(_name(name))

    def heal(self, name: str) -> None:
        """Answer questions about `name` normally again; its records are kept."""
        with self._lock:
            self._servfail.discard(_name(name))
            self._drop.discard(_name(name))

    def load(self, zone: Mapping[str, Any]) -> None:
        """Load a mapping as read from a zone JSON file (see module docstring)."""
        for key, value in zone.items():
            if key == "$servfail":
                for name in value:
                    self.servfail(name)
            elif key == "$drop":
                for name in value:
                    self.drop(name)
            else:
                for rdtype, rdata in value.items():
                    items = [rdata] if isinstance(rdata, str) else list(rdata)
                    self.add(key, rdtype, *items)

    # -------------------------------------------------------------- answers

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to `query`, or None when it must go unanswered."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        self.queries.append((_text(qname), dns.rdatatype.to_text(qtype)))
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        with self._lock:
            if qname in self._drop:
                return None
            if qname in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            self._fill(response, qname, qtype)
        return response

    def _fill(
        self, response: dns.message.Message, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> None:
        name = qname
        for _ in range(_MAX_CNAME_CHAIN):
            if not self._exists(name):
                response.set_rcode(dns.rcode.NXDOMAIN)
                self._add_soa(response, name)
                return
            node = self._records.get(name, {})
            if qtype == dns.rdatatype.ANY and node:
                response.answer.extend(r.copy() for r in node.values() if len(r))
                return
            rrset = node.get(qtype)
            if rrset is not None and len(rrset):
                response.answer.append(rrset.copy())
                return
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None or qtype == dns.rdatatype.CNAME or not len(cname):
                self._add_soa(response, name)  # NODATA
                return
            response.answer.append(cname.copy())
            name = cname[0].target
        # A CNAME chain too long: leave what we have, as real servers do.

    def _exists(self, name: dns.name.Name) -> bool:
        if name in self._records:
            return True
        return any(owner.is_subdomain(name) for owner in self._records)

    def _add_soa(self, response: dns.message.Message, name: dns.name.Name) -> None:
        candidate = name
        while True:
            soa = self._records.get(candidate, {}).get(dns.rdatatype.SOA)
            if soa is not None and len(soa):
                response.authority.append(soa.copy())
                return
            if candidate == dns.name.root:
                return
            candidate = candidate.parent()

    def _reply_wire(self, wire: bytes, *, udp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not worth a FORMERR: tests never send garbage on purpose
        try:
            response = self.answer(query)
        except dns.exception.DNSException:
            return None
        if response is None:
            return None
        if not udp:
            return response.to_wire()
        limit = max(512, min(query.payload, 65535)) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            truncated.set_rcode(response.rcode())
            return truncated.to_wire(max_size=limit)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> DnsServer:
        """Bind UDP and TCP on one port and serve from a background thread."""
        if self._thread is not None:
            raise RuntimeError("DnsServer already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            # Let cancelled callbacks and closing transports finish.
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="dns-server", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            asyncio.run_coroutine_threadsafe(self._bind(), loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    async def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        attempts = 1 if self._want_port else 50
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self._host, self._want_port)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                tcp = await loop.create_server(lambda: _Tcp(self), self._host, port)
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            self._udp, self._tcp = udp, tcp
            self.address = (self._host, port)
            return

    async def _unbind(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for transport in list(self._connections):
            transport.abort()
        if self._tcp is not None:
            await self._tcp.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run

    def stop(self) -> None:
        """Stop serving and join the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._unbind(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None
        self._udp = self._tcp = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:port"``, as the relay's `dns.nameservers` config wants it."""
        return f"{self.address[0]}:{self.address[1]}"


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self._server._reply_wire(data, udp=True)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)


class _Tcp(asyncio.Protocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self._transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._server._connections.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 2:
            (length,) = struct.unpack("!H", self._buffer[:2])
            if len(self._buffer) < 2 + length:
                return
            wire, self._buffer = self._buffer[2 : 2 + length], self._buffer[2 + length :]
            reply = self._server._reply_wire(wire, udp=False)
            if reply is not None and self._transport is not None:
                self._transport.write(struct.pack("!H", len(reply)) + reply)


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A running `DnsServer` on 127.0.0.1, empty, stopped after the test."""
    with DnsServer() as server:
        yield server


def _main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=0, help="0 = ephemeral (printed)")
    parser.add_argument("--zone", help="JSON file: {name: {type: [rdata, ...]}}")
    args = parser.parse_args(list(argv) if argv is not None else None)
    server = DnsServer(args.host, args.port)
    if args.zone:
        with open(args.zone, encoding="utf-8") as handle:
            server.load(json.load(handle))
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    with server:
        print(f"{server.address[0]}:{server.address[1]}", flush=True)
        done.wait()


if __name__ == "__main__":
    _main()
