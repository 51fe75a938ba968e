"""The demo's DNS: verrotech.com's three MX hosts, served on 127.0.0.1.

Owns the reference deployment's names and loopback addresses (MX 10
mail.verrotech.com, the primary; MX 20 mail.verrotech.net, Hektor; MX 30
mail.noc.verrotech.com, Norwich) and a tiny authoritative server that answers
UDP queries for them from dnspython wire messages. Refuses everything a real
name server does beyond that: TCP, recursion, other zones (NXDOMAIN), zone
transfers. Answers are a few hundred octets, so UDP is always enough.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

DOMAIN = "verrotech.com"
NAMESERVER_HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Host:
    """One MX host of verrotech.com as the demo runs it on loopback."""

    name: str  # its MX host name (a relay's node.hostname)
    label: str  # what the timeline calls it
    preference: int
    address: str  # a loopback address of its own, so every host can use one port


PRIMARY = Host("mail.verrotech.com", "primary", 10, "127.0.0.10")
HEKTOR = Host("mail.verrotech.net", "Hektor", 20, "127.0.0.20")
NORWICH = Host("mail.noc.verrotech.com", "Norwich", 30, "127.0.0.30")
MX_HOSTS = (PRIMARY, HEKTOR, NORWICH)


def _records() -> dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rrset.RRset]:
    """verrotech.com MX 10/20/30 and an A record for each MX host."""
    mx = dns.rrset.from_text(
        f"{DOMAIN}.", 60, "IN", "MX", *(f"{h.preference} {h.name}." for h in MX_HOSTS)
    )
    records = {(mx.name, dns.rdatatype.MX): mx}
    for host in MX_HOSTS:
        a = dns.rrset.from_text(f"{host.name}.", 60, "IN", "A", host.address)
        records[(a.name, dns.rdatatype.A)] = a
    return records


class ZoneServer:
    """Answers questions about verrotech.com on 127.0.0.1, a free UDP port."""

    def __init__(self) -> None:
        self._records = _records()
        self._names = {name for name, _ in self._records}
        self._transport: asyncio.DatagramTransport | None = None
        self.port = 0

    @property
    def nameserver(self) -> str:
        """``127.0.0.1:PORT``, as a relay's `dns.nameservers` wants it."""
        return f"{NAMESERVER_HOST}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(NAMESERVER_HOST, 0)
        )
        self._transport = transport
        self.port = int(self._transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def answer(self, wire: bytes) -> bytes | None:
        """The reply to one query in wire format; None for garbage (no reply)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        rrset = self._records.get((question.name, question.rdtype))
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
        elif rrset is not None:
            response.answer.append(rrset)
        elif question.name not in self._names:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()  # else NODATA: the name exists, not that type


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: ZoneServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        reply = self._server.answer(data)
        if reply is not None and self._transport is not None:
            with contextlib.suppress(OSError):
                self._transport.sendto(reply, addr)
