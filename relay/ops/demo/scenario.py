"""The demo's story: the reference deployment through an outage of its primary.

Owns the order of events and what counts as success. The primary (MX 10)
starts down; the sender's mail goes to Hektor (MX 20); Hektor stops for
maintenance, so the sender falls back to Norwich (MX 30); the primary comes
back and Norwich, which found it down, hands its mail over by itself (its
next attempt or backoff probe gets through); Hektor starts again and hands
over what its queue kept while it was stopped. Every message must reach the
primary exactly once, counted there by Message-ID. Refuses to wait by
sleeping: each step waits for the relay log line, the SMTP reply or the
delivery that ends it, within one overall deadline.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.ops.demo.primary import Delivery, Primary
from relay.ops.demo.relays import DemoError, RelayNode
from relay.ops.demo.sender import Sender, Sent
from relay.ops.demo.timeline import Timeline
from relay.ops.demo.zone import DOMAIN, HEKTOR, MX_HOSTS, NORWICH, PRIMARY, ZoneServer

RECIPIENT = f"alice@{DOMAIN}"
DEADLINE = 50.0  # seconds for the whole story: the demo promises under a minute


@dataclass(frozen=True, slots=True)
class Result:
    sent: int
    delivered: int  # distinct messages the primary received
    lost: int
    duplicated: int  # copies the primary received beyond the first

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.delivered == self.sent and not self.lost \
            and not self.duplicated

    @property
    def line(self) -> str:
        return (f"demo: {self.sent} sent, {self.delivered} delivered to the primary, "
                f"{self.lost} lost, {self.duplicated} duplicated")


def free_port(*hosts: str) -> int:
    """A TCP port free on every one of `hosts` (each MX host listens on it)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise DemoError(f"no TCP port free on all of {', '.join(hosts)}")


class Demo:
    def __init__(self, messages: int, workdir: Path, timeline: Timeline) -> None:
        self.messages = messages
        self.workdir = workdir
        self.timeline = timeline
        self.sent: list[Sent] = []
        self.queued: dict[str, tuple[str, str]] = {}  # queue ID -> (relay, Message-ID)
        self.finished: set[str] = set()  # queue IDs a relay delivered or bounced
        self.found_down: set[str] = set()  # relays that logged the primary's destination down
        self._changed = asyncio.Condition()
        self._deadline = 0.0
        self._primary: Primary | None = None
        self._relays: dict[str, RelayNode] = {}

    async def run(self) -> Result:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + DEADLINE
        try:
            port = free_port(*(h.address for h in MX_HOSTS))
        except OSError as exc:
            raise DemoError(f"cannot use loopback addresses 127.0.0.x: {exc.strerror}") from None
        zone = ZoneServer()
        await zone.start()
        primary = self._primary = Primary(PRIMARY.name, PRIMARY.address, port, self._arrived)
        try:
            await self._story(zone, primary, port)
        finally:
            await asyncio.gather(*(r.stop() for r in self._relays.values()))
            await primary.close()
            zone.close()
        return await self._result()

    async def _story(self, zone: ZoneServer, primary: Primary, port: int) -> None:
        t = self.timeline
        mx = ", ".join(f"MX {h.preference} {h.name} ({h.address})" for h in MX_HOSTS)
        t.event("dns", f"{DOMAIN}: {mx}; name server {zone.nameserver}")
        t.event("primary", f"{PRIMARY.name} is down: {PRIMARY.address}:{port} refuses connections")
        for host in (HEKTOR, NORWICH):
            self._relays[host.label] = RelayNode(host, self.workdir, port, zone.nameserver,
                                                 self._relay_log)
        hektor, norwich = self._relays[HEKTOR.label], self._relays[NORWICH.label]
        await asyncio.gather(hektor.start(self._left()), norwich.start(self._left()))
        for relay in (hektor, norwich):
            t.event(relay.label, f"relay serve as {relay.host.name} on {relay.host.address}:{port}"
                    f", queue {relay.queue_url.removeprefix('sqlite:///')}")
        sender = Sender(("127.0.0.1", zone.port), port)
        first = (self.messages + 1) // 2

        t.heading(f"1. The primary is down: the sender tries MX 10, then MX 20 ({HEKTOR.label})")
        for n in range(1, first + 1):
            await self._send(sender, n)

        t.heading(f"2. {HEKTOR.label} stops for maintenance; its queue stays on disk")
        await hektor.stop()
        t.event(hektor.label, "stopped (SIGTERM)", await self._holds())

        t.heading(f"3. MX 10 and MX 20 refuse: the sender falls back to MX 30 ({NORWICH.label})")
        for n in range(first + 1, self.messages + 1):
            await self._send(sender, n)

        await self._until(lambda: NORWICH.label in self.found_down,
                          f"{NORWICH.label} never tried to deliver")
        t.heading(f"4. The primary comes back; {NORWICH.label} hands over its mail")
        try:
            await primary.start()
        except OSError as exc:
            raise DemoError(f"primary cannot listen on {PRIMARY.address}:{port}: "
                            f"{exc.strerror}") from None
        t.event("primary", f"{PRIMARY.name} is up again", await self._holds())
        await self._until_handed_over(NORWICH.label)

        t.heading(f"5. {HEKTOR.label} starts again and hands over what it kept")
        await hektor.start(self._left())
        t.event(hektor.label, "started again", await self._holds())
        await self._until_handed_over(HEKTOR.label)
        await primary.wait_for({s.message_id for s in self.sent}, self._left())

    def _left(self) -> float:
        return max(0.1, self._deadline - asyncio.get_running_loop().time())

    async def _send(self, sender: Sender, n: int) -> None:
        sent = await sender.send(RECIPIENT, n)
        self.sent.append(sent)
        steps = [f"MX {t.preference} {_label(t.host)}: {t.result}" for t in sent.tries]
        accepted = sent.accepted_by
        if accepted is not None:
            queue_id = accepted.result.rsplit(" ", 1)[-1]
            self.queued[queue_id] = (_label(accepted.host), sent.message_id)
            steps[-1] = f"MX {accepted.preference} {_label(accepted.host)}: queued as {queue_id}"
        self.timeline.event("sender", f"message {n} {sent.message_id}: " + " → ".join(steps),
                            await self._holds())

    async def _holds(self) -> dict[str, int]:
        holds = {label: await relay.held() for label, relay in self._relays.items()}
        assert self._primary is not None
        holds["primary"] = len(self._primary.distinct())
        return holds

    async def _until(self, done: Callable[[], bool], failure: str) -> bool:
        """Until `done()` holds after a relay log line; False (and said) at the deadline."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(done), self._left())
            except TimeoutError:
                self.timeline.event("demo", f"[red]{failure} before the deadline[/]")
                return False
        return True

    async def _until_handed_over(self, label: str) -> None:
        """Until `label` delivered (or bounced) every message the sender gave it."""
        ids = {qid for qid, (holder, _) in self.queued.items() if holder == label}
        if await self._until(lambda: ids <= self.finished,
                             f"{label} did not hand over all its messages"):
            self.timeline.event(label, f"handed over all {len(ids)} messages the sender gave it",
                                await self._holds())

    def _arrived(self, delivery: Delivery) -> None:
        copies = self._primary.distinct()[delivery.message_id] if self._primary else 1
        if copies > 1:
            self.timeline.event("primary", f"[red]{delivery.message_id} arrived again "
                                f"(copy {copies}) from {_label(delivery.via)}[/]")

    async def _relay_log(self, relay: RelayNode, record: dict[str, Any]) -> None:
        event, text = record.get("event"), str(record.get("message", ""))
        queue_id = str(record.get("id", ""))
        if event in ("delivered", "bounced", "expired"):
            _, message_id = self.queued.get(queue_id, ("", queue_id))
            to = _label(str(record.get("relay", "")).split("[")[0].strip())
            what = f"delivered {message_id} to {to}" if event == "delivered" else \
                f"[red]{event} {message_id}: {record.get('reply', '')}[/]"
            self.finished.add(queue_id)
            self.timeline.event(relay.label, what)
            async with self._changed:
                self._changed.notify_all()
        elif text.startswith("destination ") or record.get("level") in ("error", "critical"):
            self.timeline.event(relay.label, text)
            if text.startswith(f"destination {DOMAIN} is down"):
                self.found_down.add(relay.label)
                async with self._changed:
                    self._changed.notify_all()

    def tally(self) -> Result:
        """What reached the primary, counted there by Message-ID."""
        copies = self._primary.distinct() if self._primary else Counter[str]()
        ids = {s.message_id for s in self.sent}
        delivered = len(ids & copies.keys())
        duplicated = sum(n - 1 for n in copies.values() if n > 1)
        return Result(len(self.sent), delivered, len(ids) - delivered, duplicated)

    def close(self) -> None:
        for relay in self._relays.values():
            relay.close()

    async def _result(self) -> Result:
        assert self._primary is not None
        held = {label: await relay.held() for label, relay in self._relays.items()}
        via = Counter(_label(d.via) for d in self._primary.deliveries)
        taken = Counter(holder for holder, _ in self.queued.values())
        self.timeline.summary([
            (f"{h.label} (MX {h.preference})", taken[h.label],
             via[h.label], held.get(h.label, 0))
            for h in (HEKTOR, NORWICH)
        ])
        return self.tally()


def _label(host: str) -> str:
    """The timeline's name for an MX host name (or the name itself)."""
    for known in MX_HOSTS:
        if host.lower().rstrip(".") == known.name:
            return known.label
    return host
