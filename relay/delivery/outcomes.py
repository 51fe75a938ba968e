"""What an attempt means for the queue: a pure decision, no I/O.

Owns the rules that turn one attempt's replies (or a routing failure, or
expiry) into recipient statuses, the next attempt time, what the attempt
tells about its destination (an `AttemptOutcome`: `relay.core.destination`
decides the state) and the DSNs to queue: failure and delay reports as each
recipient's RFC 3461 NOTIFY asks, and `Action: relayed` to a recipient that
asked for SUCCESS when the hop that took it does not offer DSN (one that
does reports success itself). Refuses to store anything: it
returns an `Attempt` for the queue to record, so every rule is table-testable.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from relay.core.config import Config
from relay.core.destination import AttemptOutcome
from relay.core.dsnparams import orcpt_address, wants, xtext_decode
from relay.core.model import UNCERTAIN_PREFIX, DeliveryReport, Outcome, RecipientStatus, Reply
from relay.core.recipients import Learned, Ttl, learned_from
from relay.delivery.backoff import BackoffPolicy
from relay.delivery.dsn import RecipientNotice, build_dsn
from relay.delivery.resolver import NoRoute
from relay.queue.rows import (
    Attempt,
    Claimed,
    DestinationUpdate,
    NewMessage,
    PendingRecipient,
    RecipientUpdate,
    new_queue_id,
)

EXPIRED_STATUS = "5.4.7"


@dataclass(frozen=True, slots=True)
class Rules:
    """The knobs decisions depend on, taken from config once."""

    hostname: str  # Reporting-MTA of our DSNs
    backoff: BackoffPolicy
    delay_warning: float  # seconds; 0 = never warn
    new_id: Callable[[], str]
    rng: random.Random
    # Destinations with `verify` on, and how long what they teach is kept.
    learning: Mapping[str, Ttl] = field(default_factory=dict)
    send_to: str = "all"  # bounces.send_to: "all" or "spf-pass"


def rules_from_config(config: Config, rng: random.Random | None = None) -> Rules:
    """The decision rules of `relay serve` and the operator's `queue bounce`."""
    return Rules(
        hostname=config.node.hostname,
        backoff=BackoffPolicy(
            min_backoff=config.delivery.min_backoff,
            max_backoff=config.delivery.max_backoff,
            max_lifetime=config.delivery.max_lifetime,
        ),
        delay_warning=config.delivery.delay_warning,
        new_id=new_queue_id,
        rng=rng or random.Random(),
        learning={name: Ttl(d.verify_valid_ttl, d.verify_invalid_ttl)
                  for name, d in config.domains.items() if d.verify != "off"},
        send_to=config.bounces.send_to,
    )


@dataclass(frozen=True, slots=True)
class Decision:
    attempt: Attempt
    results: tuple[tuple[str, Outcome, Reply], ...]  # for the mail log and metrics
    outcome: AttemptOutcome  # what the attempt told about its destination


def decide(
    rules: Rules,
    message: Claimed,
    owner: str,
    now: datetime,
    *,
    report: DeliveryReport | NoRoute | None,
    original: bytes,
    destination_failures: int = 0,
    operator_bounce: bool = False,
) -> Decision:
    """Turn one attempt into an Attempt record.

    `report` is the transport's result, a resolver failure, or None when no
    attempt was made (expired in the queue, or an operator's bounce).
    """
    expired = rules.backoff.expired(message.received_at, now)
    site_failure = False
    remote = ""
    last_error = ""
    if isinstance(report, DeliveryReport):
        replies = {r.address: report.replies.get(r.address, _NO_REPLY) for r in message.recipients}
        site_failure = report.site_failure
        remote = report.remote_host or ""
        if report.errors:
            last_error = report.errors[-1]
    elif isinstance(report, NoRoute):
        code = 550 if report.permanent else 451
        reply = Reply(code, f"{report.status} {report.reason}")
        replies = {r.address: reply for r in message.recipients}
        site_failure = not report.permanent
        last_error = report.reason
    elif operator_bounce:
        reply = Reply(550, "5.0.0 message returned by the postmaster")
        replies = {r.address: reply for r in message.recipients}
    else:
        reply = Reply(550, f"{EXPIRED_STATUS} message expired: too long in the queue")
        replies = {r.address: reply for r in message.recipients}

    updates: list[RecipientUpdate] = []
    bounced: list[tuple[PendingRecipient, Reply]] = []
    deferred: list[tuple[PendingRecipient, Reply]] = []
    results: list[tuple[str, Outcome, Reply]] = []
    for rcpt in message.recipients:
        reply = replies[rcpt.address]
        outcome = reply.outcome
        logged = outcome
        # An uncertain attempt is retried like a deferral: a duplicate beats a loss.
        if outcome in _WAITS and expired:
            outcome, logged = Outcome.BOUNCED, Outcome.EXPIRED  # keeps the last real reason
        if report is None and not operator_bounce:
            logged = Outcome.EXPIRED
        stored = f"{UNCERTAIN_PREFIX}{reply}" if reply.uncertain else str(reply)
        updates.append(RecipientUpdate(rcpt.id, rcpt.address, _STATUS[outcome], stored, logged))
        results.append((rcpt.address, outcome, reply))
        if outcome is Outcome.BOUNCED:
            bounced.append((rcpt, reply))
        elif outcome in _WAITS:
            deferred.append((rcpt, reply))
            if not last_error:
                last_error = stored

    verdict = _verdict(report, operator_bounce, site_failure, bool(deferred), results)
    destination = DestinationUpdate(message.destination, verdict)
    next_attempt: datetime | None = None
    if verdict is AttemptOutcome.SITE_FAILURE:
        retry = rules.backoff.next_attempt(now, destination_failures + 1, rules.rng)
        destination = DestinationUpdate(message.destination, verdict, retry, last_error)
    elif deferred:
        next_attempt = rules.backoff.next_attempt(now, message.attempts + 1, rules.rng)

    dsns: list[NewMessage] = []
    bounced = _asked(bounced, "FAILURE")
    if bounced and message.sender and not message.is_dsn:
        dsns.append(_dsn(rules, message, now, original, "failed", bounced, remote))
    relayed = _relayed(message, report, replies)
    if relayed and message.sender and not message.is_dsn:
        dsns.append(_dsn(rules, message, now, original, "relayed", relayed, remote))
    warn = (
        bool(deferred)
        and rules.delay_warning > 0
        and not message.delay_warned
        and message.sender != ""
        and not message.is_dsn
        and now - message.received_at >= timedelta(seconds=rules.delay_warning)
    )
    if warn and _asked(deferred, "DELAY"):
        dsns.append(_dsn(rules, message, now, original, "delayed", _asked(deferred, "DELAY"),
                         remote))

    held = suppressed(rules, message)  # every DSN of this attempt passes here
    attempt = Attempt(
        message_id=message.id,
        owner=owner,
        lease_until=message.lease_until,
        at=now,
        recipients=tuple(updates),
        next_attempt_at=next_attempt,
        last_error=last_error,
        remote_host=remote,
        dsns=() if held else tuple(dsns),
        suppressed=(held,) * len(dsns) if held else (),
        destination=destination,
        counted=report is not None,
        delay_warned=warn,
        learned=_learned(rules, message, report),
    )
    return Decision(attempt, tuple(results), verdict)


def _asked(
    recipients: Sequence[tuple[PendingRecipient, Reply]], event: str
) -> list[tuple[PendingRecipient, Reply]]:
    """Those whose NOTIFY asks for a DSN on `event` (FAILURE, DELAY, SUCCESS)."""
    return [(rcpt, reply) for rcpt, reply in recipients if wants(rcpt.params.notify, event)]


def _relayed(
    message: Claimed, report: DeliveryReport | NoRoute | None, replies: Mapping[str, Reply]
) -> list[tuple[PendingRecipient, Reply]]:
    """Delivered recipients that asked for SUCCESS from a hop that does not
    offer DSN: RFC 3461 4.1 makes us tell them it was `relayed`."""
    if not isinstance(report, DeliveryReport) or report.hop_dsn:
        return []
    delivered = [(rcpt, replies[rcpt.address]) for rcpt in message.recipients
                 if replies[rcpt.address].outcome is Outcome.DELIVERED]
    return _asked(delivered, "SUCCESS")


def _learned(
    rules: Rules, message: Claimed, report: DeliveryReport | NoRoute | None
) -> tuple[Learned, ...]:
    """What the next hop's own replies taught about its recipients; only
    replies it gave count (never ours: no route, expiry, no reply recorded)."""
    if not isinstance(report, DeliveryReport) or message.destination not in rules.learning:
        return ()
    learned = []
    for rcpt in message.recipients:
        reply = report.replies.get(rcpt.address)
        state = learned_from(reply) if reply is not None else None
        if state is not None:
            learned.append(Learned(rcpt.address, state))
    return tuple(learned)


_STATUS = {
    Outcome.DELIVERED: RecipientStatus.DELIVERED,
    Outcome.DEFERRED: RecipientStatus.DEFERRED,
    Outcome.UNCERTAIN: RecipientStatus.DEFERRED,
    Outcome.BOUNCED: RecipientStatus.BOUNCED,
}
_WAITS = frozenset({Outcome.DEFERRED, Outcome.UNCERTAIN})  # retried later


def _verdict(
    report: DeliveryReport | NoRoute | None,
    operator_bounce: bool,
    site_failure: bool,
    deferred: bool,
    results: Sequence[tuple[str, Outcome, Reply]],
) -> AttemptOutcome:
    """What the attempt tells about its destination (see relay.core.destination).

    A site failure counts only while some recipient still waits for the
    destination: when all of them expired, nothing waits to be parked. An
    uncertain recipient counts as deferred: the next hop answered up to the
    final dot, so its destination is up.
    """
    if report is None:
        return AttemptOutcome.RETURNED if operator_bounce else AttemptOutcome.EXPIRED
    if site_failure:
        return AttemptOutcome.SITE_FAILURE if deferred else AttemptOutcome.EXPIRED
    if isinstance(report, NoRoute):
        return AttemptOutcome.UNROUTABLE
    outcomes = {Outcome.DEFERRED if o is Outcome.UNCERTAIN else o for _, o, _ in results}
    for worst in (Outcome.DEFERRED, Outcome.BOUNCED):
        if worst in outcomes:
            return AttemptOutcome(worst.value)
    return AttemptOutcome.DELIVERED


_NO_REPLY = Reply(451, "4.3.0 no reply recorded for this recipient")


def _last_reply(last_error: str) -> Reply:
    """The stored last error ("451 4.4.1 connect to ...") as a Reply."""
    code, _, text = last_error.partition(" ")
    if len(code) == 3 and code.isdigit() and code[0] == "4":
        return Reply(int(code), text)
    return Reply(451, f"4.4.7 {last_error or 'not yet delivered'}")


def delay_notice(
    rules: Rules, message: Claimed, owner: str, now: datetime, original: bytes
) -> Attempt:
    """Tell the sender that a message still waits (it is not attempted now).

    Everything else about the message stays as it was: no attempt is counted,
    recipients and the next attempt time are unchanged.
    """
    reply = _last_reply(message.last_error)
    asked = _asked([(rcpt, reply) for rcpt in message.recipients], "DELAY")
    held = suppressed(rules, message) if asked else None
    dsns = () if held or not asked else (_dsn(rules, message, now, original, "delayed", asked, ""),)
    return Attempt(
        message_id=message.id,
        owner=owner,
        lease_until=message.lease_until,
        at=now,
        recipients=(),
        next_attempt_at=message.next_attempt_at,
        last_error=message.last_error,
        dsns=dsns,
        destination=DestinationUpdate(message.destination, AttemptOutcome.RETURNED),
        counted=False,
        delay_warned=True,
        suppressed=(held,) if held else (),
    )


def suppressed(rules: Rules, message: Claimed) -> str | None:
    """The SPF result that withholds DSNs to this message's sender under
    `bounces.send_to = "spf-pass"` (a message stored without one counts as
    `none`), or None when they may go."""
    if rules.send_to != "spf-pass":
        return None
    result = message.spf or "none"
    return None if result == "pass" else result


def _dsn(
    rules: Rules,
    message: Claimed,
    now: datetime,
    original: bytes,
    action: str,
    recipients: Sequence[tuple[PendingRecipient, Reply]],
    remote: str,
) -> NewMessage:
    remote_mta = remote.split("[", 1)[0] or None
    until = message.received_at + timedelta(seconds=rules.backoff.max_lifetime)
    notices = [
        RecipientNotice(
            address=rcpt.address,
            action=action,  # type: ignore[arg-type]
            reply=reply,
            remote_mta=remote_mta if (reply.code >= 400 or action == "relayed") else None,
            last_attempt=now,
            will_retry_until=until if action == "delayed" else None,
            original_recipient=_orcpt(rcpt),
        )
        for rcpt, reply in recipients
    ]
    envid = xtext_decode(message.dsn.envid) if message.dsn.envid is not None else None
    dsn_id = rules.new_id()
    built = build_dsn(
        reporting_mta=rules.hostname,
        original_sender=message.sender,
        queue_id=message.id,
        dsn_id=dsn_id,
        arrival=message.received_at,
        now=now,
        notices=notices,
        original=original,
        envid=envid if isinstance(envid, str) else None,
        ret=message.dsn.ret,
        smtputf8=message.smtputf8,
    )
    return NewMessage(
        id=dsn_id,
        sender="",
        recipients=(message.sender,),
        data=built.data,
        received_at=now,
        smtputf8=built.smtputf8,
        eightbit=built.eightbit,
        is_dsn=True,
    )


def _orcpt(rcpt: PendingRecipient) -> tuple[str, str] | None:
    """ORCPT as (addr-type, address) for Original-Recipient; checked when given."""
    if rcpt.params.orcpt is None:
        return None
    parsed = orcpt_address(rcpt.params.orcpt)
    return parsed if isinstance(parsed, tuple) else None
