"""The demo's primary MX (mail.verrotech.com): an SMTP server that only records.

Owns listening on the primary's loopback address when told to come up,
answering every message `250`, and remembering each delivery (Message-ID,
which relay brought it, by its EHLO name) so the demo can count what arrived,
what is missing and what came twice. Refuses to store or pass on anything:
it stands in for the real mailbox server, which is not ours.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message the primary accepted."""

    message_id: str
    via: str  # the EHLO name of the host that delivered it


class Primary:
    """Down until `start()`: connections to its address are refused until then."""

    def __init__(self, hostname: str, address: str, port: int,
                 on_delivery: Callable[[Delivery], None]) -> None:
        self.hostname = hostname
        self.address = address
        self.port = port
        self.deliveries: list[Delivery] = []
        self._on_delivery = on_delivery
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()
        self._arrived = asyncio.Condition()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._session, self.address, self.port)

    def _session(self) -> SMTP:
        session = _Session(self, hostname=self.hostname, enable_SMTPUTF8=True)
        self._sessions.add(session)
        return session

    async def close(self) -> None:
        """Stop listening and cut the sessions still open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for session in list(self._sessions):
            if isinstance(session.transport, asyncio.Transport):
                session.transport.abort()
        await server.wait_closed()

    def distinct(self) -> Counter[str]:
        """How many times each Message-ID arrived."""
        return Counter(d.message_id for d in self.deliveries)

    async def wait_for(self, message_ids: set[str], timeout: float) -> bool:
        """Until every one of `message_ids` arrived at least once (False on timeout)."""
        async with self._arrived:
            try:
                await asyncio.wait_for(
                    self._arrived.wait_for(lambda: message_ids <= self.distinct().keys()),
                    timeout,
                )
            except TimeoutError:
                return False
        return True

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        headers = BytesHeaderParser().parsebytes(data)
        delivery = Delivery(str(headers.get("Message-ID", "")).strip(), session.host_name or "?")
        self.deliveries.append(delivery)
        self._on_delivery(delivery)
        async with self._arrived:
            self._arrived.notify_all()
        return "250 2.0.0 Ok: delivered"


class _Session(SMTP):
    """An aiosmtpd session that tells the primary when it ends."""

    def __init__(self, primary: Primary, **options: object) -> None:
        super().__init__(primary, **options)  # type: ignore[arg-type]
        self._primary = primary

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._primary._sessions.discard(self)
