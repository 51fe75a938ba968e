"""One callout: ask a destination's next hop whether it would take an address.

Owns the outbound probe of `verify = "callout"` (SPEC "Knowing recipients"):
the hops in order, as routing found them, each one connect, greeting, EHLO
(HELO after a 5xx) with our node name, `MAIL FROM:<>`, `RCPT TO:<address>`
and QUIT; no message is ever sent. STARTTLS only when `delivery.tls` insists
on it ("required", "verify": as delivery would, the certificate checked for
"verify"); with "none" or "opportunistic" a probe goes in plaintext, as it
carries one address and no content and a handshake would cost it most of its
time. What the end means: a reply to RCPT teaches what a delivery's would
(`relay.core.recipients.learned_from`: 2xx `valid`, 5xx with `5.1.x`
`invalid`, anything else `unknown`); no reply to RCPT (no connection, no or
a garbled greeting, a refused EHLO or `MAIL FROM:<>`, a reset, the time up)
is `unknown` too, and says the hop did not answer.

The whole probe, QUIT included, runs within one timeout; the verdict is told
to the caller as soon as RCPT is answered, before QUIT. Refuses choosing
hops (`resolver.py`), bounding how many probes run and caching what they
learn (`relay.smtp.callouts`), and raising: every end is a `Probe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPException, SMTPHeloError, SMTPResponse

from relay.core.model import Hop, Reply
from relay.core.recipients import KnownState, learned_from
from relay.delivery.replies import hop_label
from relay.delivery.session import TlsPolicy, client_tls_context, sni_name, verified_name

UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Probe:
    """How one probe ended."""

    result: str  # "valid", "invalid" or "unknown"
    host: str  # the hop that answered (or was last tried), "" when none was
    reply: str  # the reply to RCPT, or why there was none
    answered: bool  # a hop replied to RCPT: the destination is up

    @property
    def state(self) -> KnownState | None:
        """What is learned: None for `unknown`."""
        return None if self.result == UNKNOWN else KnownState(self.result)


class _NoAnswer(Exception):
    """This hop gave no reply to RCPT; the reason is the message."""


class CalloutClient:
    """Probes over SMTP with aiosmtplib; one connection per probe, never reused
    (a probe is rare next to RCPTs: its verdict is cached by the caller)."""

    def __init__(self, *, helo_name: str, tls: TlsPolicy,
                 verify_context: ssl.SSLContext | None = None) -> None:
        self.helo_name = helo_name
        self.tls: TlsPolicy = tls
        self.verify_context = verify_context
        self._tls_context = client_tls_context()
        self.connections = 0  # for tests and benchmarks

    async def probe(self, address: str, hops: Sequence[Hop], timeout: float,
                    told: Callable[[Probe], None] | None = None) -> Probe:
        """Ask `hops` in order about `address` within `timeout` seconds, QUIT
        included; `told` hears the verdict the moment RCPT is answered."""
        last = Probe(UNKNOWN, "", "no next hop to ask", answered=False)
        verdict: list[Probe] = []

        def tell(probe: Probe) -> None:
            verdict.append(probe)
            if told is not None:
                told(probe)

        try:
            async with asyncio.timeout(timeout):
                for hop in hops:
                    last = Probe(UNKNOWN, hop_label(hop), "", answered=False)
                    last = await self._one(address, hop, tell)
                    if last.answered:
                        return last
        except TimeoutError:
            if verdict:  # only QUIT was left
                return verdict[0]
            last = Probe(UNKNOWN, last.host, f"no answer within {timeout:g} s", answered=False)
        return last

    async def _one(self, address: str, hop: Hop, told: Callable[[Probe], None]) -> Probe:
        label = hop_label(hop)
        smtp = aiosmtplib.SMTP(hostname=hop.address, port=hop.port,
                               local_hostname=self.helo_name, start_tls=False, timeout=None)
        self.connections += 1
        try:
            try:
                reply = await self._ask(smtp, hop, address)
            except _NoAnswer as exc:
                return Probe(UNKNOWN, label, str(exc), answered=False)
            except (SMTPException, OSError, ValueError, ssl.SSLError) as exc:
                return Probe(UNKNOWN, label, _reason(exc), answered=False)
            state = learned_from(reply)
            probe = Probe(state.value if state is not None else UNKNOWN, label, str(reply),
                          answered=True)
            told(probe)
            with contextlib.suppress(SMTPException, OSError):
                await smtp.quit()  # a courtesy: the verdict is known
            return probe
        finally:
            smtp.close()

    async def _ask(self, smtp: aiosmtplib.SMTP, hop: Hop, address: str) -> Reply:
        """The reply to RCPT TO, or `_NoAnswer` (or aiosmtplib's error) why none."""
        await smtp.connect()
        await self._hello(smtp)
        if self.tls in ("required", "verify"):
            if not smtp.supports_extension("starttls"):
                raise _NoAnswer("TLS is required, but was not offered")
            verify = self.tls == "verify"
            context = self.verify_context if verify and self.verify_context else self._tls_context
            await smtp.starttls(
                tls_context=context,
                server_hostname=verified_name(hop.host) if verify else sni_name(hop.host))
            await self._hello(smtp)
        utf8 = not address.isascii()
        if utf8 and not smtp.supports_extension("smtputf8"):
            raise _NoAnswer("the address needs SMTPUTF8, which is not offered")
        mail = await smtp.execute_command(b"MAIL", b"FROM:<>", *([b"SMTPUTF8"] if utf8 else []))
        if not 200 <= mail.code < 300:
            raise _NoAnswer(f"MAIL FROM:<> refused: {_line(mail)}")
        rcpt = await smtp.execute_command(b"RCPT", f"TO:<{address}>".encode())
        return Reply(rcpt.code, rcpt.message.replace("\n", " ").strip())

    @staticmethod
    async def _hello(smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except SMTPHeloError as exc:
            if not 500 <= exc.code < 600:
                raise
            await smtp.helo()


def _line(response: SMTPResponse) -> str:
    return f"{response.code} {response.message}".replace("\n", " ").strip()


def _reason(exc: BaseException) -> str:
    """One line for the log: what went wrong before RCPT was answered."""
    text = str(exc).replace("\n", " ").strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
