"""Outbound SMTP: hand one message to one destination's hops.

Owns trying a destination's hops in order (falling back to plaintext once when
"opportunistic" TLS fails its handshake), keeping sessions open for the next
message to the same address (reuse limits, idle expiry), and the one
`DeliveryReport` per attempt. One connection's dialogue is `session.py`; the
wording of synthetic replies is `replies.py`.

Refuses: finding hops (MX lookup and loop avoidance belong to routing), deciding
what a reply means for the queue (defer, bounce, backoff: the scheduler's), any
database access, and raising to its caller: `deliver` always returns a
`DeliveryReport`, with synthetic Postfix-like replies (``451 4.4.1 connect to
host[ip]:port: Connection refused``) for failures that have no remote reply.

A hop "fails at session level" when it cannot start a transaction: no
connection, a greeting or EHLO/HELO that is not 2xx, TLS that "required" could
not get, a 4xx (or an unexpected code) to MAIL FROM, or a lost connection
before MAIL FROM was accepted. The next hop is then tried. Once MAIL FROM is
accepted the hop decides: its replies are final for this attempt.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.core.model import DeliveryReport, Hop, OutboundMessage, Reply
from relay.delivery.replies import SOFT_FAILURE, SessionFailure, TlsHandshakeFailure, hop_label
from relay.delivery.session import Session, TlsPolicy, client_tls_context, verifying_tls_context

__all__ = ["SmtpTransport", "TlsPolicy", "Transport", "verifying_tls_context"]

log = logging.getLogger(__name__)

REUSE_LIMIT = 100  # messages per session before a fresh connection
IDLE_TIME = 5.0  # seconds an unused session waits for the next message
MAX_SESSION_AGE = 300.0  # seconds: then a fresh connection (Postfix's reuse time limit)


class Transport(Protocol):
    """Delivers one message to one destination, given its hops in order."""

    async def deliver(self, message: OutboundMessage, hops: Sequence[Hop]) -> DeliveryReport: ...


class SmtpTransport:
    """`Transport` over SMTP with aiosmtplib, reusing sessions per remote address.

    A session that delivered a message waits up to IDLE_TIME for the next
    message to the same address (RSET between transactions), for at most
    REUSE_LIMIT messages and MAX_SESSION_AGE seconds; a cached session that
    went stale is closed and replaced by a fresh one without counting against
    the hop.

    `tls`: "none" never sends STARTTLS; "opportunistic" uses it when offered and
    retries the same hop once in plaintext if the handshake fails; "required"
    treats a hop without working STARTTLS as down (deferred, 4.7.x) without
    checking its certificate (Postfix "may" / "encrypt"); "verify" is "required"
    plus a certificate valid for the hop's name under `verify_context`'s CAs
    (Postfix "verify"): a failure defers that hop and the next one is tried.
    """

    def __init__(
        self,
        *,
        helo_name: str,
        tls: TlsPolicy,
        connect_timeout: float,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
        verify_context: ssl.SSLContext | None = None,
        reuse_limit: int = REUSE_LIMIT,
        idle_time: float = IDLE_TIME,
        max_age: float = MAX_SESSION_AGE,
    ) -> None:
        if tls not in ("none", "opportunistic", "required", "verify"):
            raise ValueError(f"tls must be none, opportunistic, required or verify, not {tls!r}")
        self.helo_name = helo_name
        self.tls: TlsPolicy = tls
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self._tls_context = client_tls_context()
        # Built by the caller (a CA file is read once, off the event loop when reloading).
        self.verify_context = verify_context or verifying_tls_context()
        self.reuse_limit = reuse_limit
        self.idle_time = idle_time
        self.max_age = max_age
        self._idle: dict[tuple[str, int], list[_Cached]] = {}
        self.sessions_opened = 0  # for tests and benchmarks: sessions vs. messages
        self._closing: set[asyncio.Future[None]] = set()

    async def deliver(self, message: OutboundMessage, hops: Sequence[Hop]) -> DeliveryReport:
        """Try `hops` in order until one decides; never raises (but for cancellation)."""
        errors: list[str] = []
        last = Reply(SOFT_FAILURE, "4.4.3 no next hop to try")
        try:
            for hop in hops:
                tls = self.tls
                while True:
                    try:
                        replies, hop_dsn = await self._attempt(message, hop, tls)
                    except TlsHandshakeFailure as failure:
                        errors.append(str(failure.reply))
                        log.info("%s: %s", message.queue_id, failure.reply)
                        if tls == "opportunistic":
                            tls = "none"  # Postfix "may": the same hop once more, in plaintext
                            continue
                        last = failure.reply
                        break
                    except SessionFailure as failure:
                        errors.append(str(failure.reply))
                        log.info("%s: %s", message.queue_id, failure.reply)
                        last = failure.reply
                        break
                    return DeliveryReport(replies=replies, remote_host=hop_label(hop),
                                          errors=tuple(errors), hop_dsn=hop_dsn)
        except Exception as exc:  # a bug here must not lose the message: defer it
            log.exception("%s: unexpected error in the SMTP client", message.queue_id)
            reply = Reply(SOFT_FAILURE, f"4.3.0 local error in the SMTP client: {exc!r}")
            return DeliveryReport(
                replies=dict.fromkeys(message.recipients, reply),
                errors=(*errors, str(reply)),
            )
        if not hops:
            errors.append(str(last))
        return DeliveryReport(
            replies=dict.fromkeys(message.recipients, last),
            site_failure=True,
            errors=tuple(errors),
        )

    async def _attempt(
        self, message: OutboundMessage, hop: Hop, tls: TlsPolicy
    ) -> tuple[dict[str, Reply], bool]:
        """The replies of one hop, and whether it offered DSN."""
        key = (hop.address, hop.port)
        while (cached := self._take_idle(key)) is not None:
            try:
                replies = await cached.session.send(message)
            except SessionFailure:
                await cached.session.close()  # went stale while idle: not the hop's fault
                continue
            except BaseException:
                cached.session.abort()
                raise
            cached.sent += 1
            await self._keep_or_close(key, cached)
            return replies, cached.session.offers_dsn
        session = Session(
            hop,
            helo_name=self.helo_name,
            tls=tls,
            tls_context=self.verify_context if tls == "verify" else self._tls_context,
            connect_timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            data_timeout=self.data_timeout,
        )
        self.sessions_opened += 1
        try:
            await session.open()
            replies = await session.send(message)
        except BaseException:
            await session.close()
            raise
        await self._keep_or_close(key, _Cached(session, time.monotonic(), sent=1))
        return replies, session.offers_dsn

    # ------------------------------------------------------------ connection cache

    def _take_idle(self, key: tuple[str, int]) -> _Cached | None:
        pool = self._idle.get(key)
        while pool:
            cached = pool.pop()
            if cached.timer is not None:
                cached.timer.cancel()
            if cached.session.connected:
                return cached
            cached.session.abort()
        return None

    async def _keep_or_close(self, key: tuple[str, int], cached: _Cached) -> None:
        """Keep a healthy session for the next message to the same address, for a while."""
        fresh = time.monotonic() - cached.opened < self.max_age
        if cached.session.connected and cached.sent < self.reuse_limit and fresh:
            loop = asyncio.get_running_loop()
            cached.timer = loop.call_later(self.idle_time, self._expire, key, cached)
            self._idle.setdefault(key, []).append(cached)
        else:
            await cached.session.close()

    def _expire(self, key: tuple[str, int], cached: _Cached) -> None:
        pool = self._idle.get(key, [])
        if cached in pool:
            pool.remove(cached)
            task = asyncio.ensure_future(cached.session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle session (on shutdown)."""
        sessions = [c for pool in self._idle.values() for c in pool]
        self._idle.clear()
        for cached in sessions:
            if cached.timer is not None:
                cached.timer.cancel()
        await asyncio.gather(*(c.session.close() for c in sessions), *self._closing,
                             return_exceptions=True)


@dataclass(eq=False)
class _Cached:
    session: Session
    opened: float
    sent: int = 0
    timer: asyncio.TimerHandle | None = None
