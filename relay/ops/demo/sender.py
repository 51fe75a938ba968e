"""The demo's sending MTA: looks up verrotech.com's MX set and follows it.

Owns one message's way in, as any MTA on the Internet does it: MX records
by preference, each host's addresses in turn, the first that answers `250`
keeps the message. Refuses to queue or retry later: when no MX host takes a
message the demo reports it, which is what it is there to show.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver

CLIENT_NAME = "client.sender.example"
SENDER = "newsletter@sender.example"


@dataclass(frozen=True, slots=True)
class Try:
    """One MX host tried for a message."""

    preference: int
    host: str
    result: str  # "250 ..." when it took the message, else why not


@dataclass(frozen=True, slots=True)
class Sent:
    message_id: str
    tries: tuple[Try, ...]

    @property
    def accepted_by(self) -> Try | None:
        last = self.tries[-1] if self.tries else None
        return last if last is not None and last.result.startswith("250") else None


def message(n: int, recipient: str) -> tuple[str, bytes]:
    """Message number `n`: its Message-ID and its bytes."""
    message_id = f"<demo-{n}@sender.example>"
    data = (
        f"From: Newsletter <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: demo message {n}\r\n"
        f"Message-ID: {message_id}\r\n\r\nHello from the mx-relay demo, message {n}.\r\n"
    ).encode()
    return message_id, data


class Sender:
    """Sends through whatever MX host of the domain answers first, in MX order."""

    def __init__(self, nameserver: tuple[str, int], smtp_port: int, timeout: float = 5.0) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = [nameserver[0]]
        self._resolver.port = nameserver[1]
        self._resolver.lifetime = timeout
        self._port = smtp_port
        self._timeout = timeout

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        answer = await self._resolver.resolve(domain, "MX")
        return sorted((r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer)

    async def send(self, recipient: str, n: int) -> Sent:
        message_id, data = message(n, recipient)
        tries: list[Try] = []
        try:
            hosts = await self.mx(recipient.rpartition("@")[2])
        except dns.exception.DNSException as exc:
            return Sent(message_id, (Try(0, "-", f"MX lookup failed: {exc}"),))
        for preference, host in hosts:
            result = await self._try_host(host, recipient, data)
            tries.append(Try(preference, host, result))
            if result.startswith("250"):
                break
        return Sent(message_id, tuple(tries))

    async def _try_host(self, host: str, recipient: str, data: bytes) -> str:
        try:
            addresses = [r.to_text() for r in await self._resolver.resolve(host, "A")]
        except dns.exception.DNSException as exc:
            return f"no address: {exc}"
        result = "no address"
        for address in addresses:
            client = aiosmtplib.SMTP(hostname=address, port=self._port, timeout=self._timeout,
                                     local_hostname=CLIENT_NAME, start_tls=False)
            try:
                async with client:
                    _refused, reply = await client.sendmail(SENDER, [recipient], data)
                return f"250 {reply}"
            except aiosmtplib.SMTPConnectTimeoutError:
                result = "no answer"
            except aiosmtplib.SMTPConnectError:
                result = "connection refused"
            except (aiosmtplib.SMTPException, OSError) as exc:
                result = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return result
