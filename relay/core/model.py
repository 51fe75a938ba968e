"""Pure types shared by every stage: states, transitions, hops, replies, outcomes.

Owns the vocabulary of the queue (message states, recipient statuses and the
transitions allowed between them) and the values that stages hand each other.
Refuses any I/O: nothing here touches a socket, a clock or a database.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from relay.core.dsnparams import NO_MAIL_PARAMS, MailParams, RcptParams

_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


class MessageState(enum.StrEnum):
    """What the scheduler is doing with a message, as operators see it."""

    ACTIVE = "active"  # a delivery attempt is running right now
    DEFERRED = "deferred"  # waiting for its next attempt (or its first one)
    HOLD = "hold"  # an operator stopped delivery until released


class RecipientStatus(enum.StrEnum):
    """Where one recipient of a message stands."""

    QUEUED = "queued"  # accepted, never attempted
    DEFERRED = "deferred"  # attempted, failed temporarily, will be retried
    DELIVERED = "delivered"  # the next hop answered 2xx: final
    BOUNCED = "bounced"  # failed permanently or expired: final, sender told

    @property
    def final(self) -> bool:
        return self in (RecipientStatus.DELIVERED, RecipientStatus.BOUNCED)


RECIPIENT_TRANSITIONS: dict[RecipientStatus, frozenset[RecipientStatus]] = {
    RecipientStatus.QUEUED: frozenset(
        {RecipientStatus.DEFERRED, RecipientStatus.DELIVERED, RecipientStatus.BOUNCED}
    ),
    RecipientStatus.DEFERRED: frozenset(
        {RecipientStatus.DEFERRED, RecipientStatus.DELIVERED, RecipientStatus.BOUNCED}
    ),
    RecipientStatus.DELIVERED: frozenset(),
    RecipientStatus.BOUNCED: frozenset(),
}

MESSAGE_TRANSITIONS: dict[MessageState, frozenset[MessageState]] = {
    MessageState.DEFERRED: frozenset(
        {MessageState.ACTIVE, MessageState.HOLD, MessageState.DEFERRED}
    ),
    MessageState.ACTIVE: frozenset({MessageState.DEFERRED, MessageState.HOLD}),
    MessageState.HOLD: frozenset({MessageState.DEFERRED, MessageState.HOLD}),
}


def recipient_may_become(current: RecipientStatus, new: RecipientStatus) -> bool:
    """True when a recipient in `current` may move to `new`."""
    return new in RECIPIENT_TRANSITIONS[current]


def message_may_become(current: MessageState, new: MessageState) -> bool:
    """True when a message in `current` may move to `new`."""
    return new in MESSAGE_TRANSITIONS[current]


class Outcome(enum.StrEnum):
    """The closed set of results one delivery attempt gives one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"  # bounced unattempted: too long in the queue (logged as such)
    # The connection was lost (or timed out) after the final "." of DATA: the next
    # hop may have the message (RFC 1047). Retried like a deferral.
    UNCERTAIN = "uncertain"


# What a reply gives (the metric's labels).
ATTEMPT_RESULTS = (Outcome.DELIVERED, Outcome.DEFERRED, Outcome.BOUNCED, Outcome.UNCERTAIN)

# How a recipient's stored last reply starts while its latest attempt was uncertain.
UNCERTAIN_PREFIX = "delivery uncertain: "


@dataclass(frozen=True, slots=True)
class Hop:
    """One address to try, in order: the MX host it came from and its IP."""

    host: str  # MX host name (or next_hop host), for logs and Remote-MTA
    address: str  # IPv4/IPv6 literal to connect to
    port: int
    preference: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply as the remote (or we, for local failures) gave it."""

    code: int
    text: str  # e.g. "5.1.1 <bob@example.com>: User unknown"
    # No reply came after the final "." (lost or timed out): a 4xx of ours whose
    # outcome is unknown, so a flag rather than a text to match.
    uncertain: bool = False

    @property
    def outcome(self) -> Outcome:
        if self.uncertain:
            return Outcome.UNCERTAIN
        if 200 <= self.code < 300:
            return Outcome.DELIVERED
        if 500 <= self.code < 600:
            return Outcome.BOUNCED
        return Outcome.DEFERRED

    @property
    def enhanced_status(self) -> str:
        """The RFC 3463 code in the text, else one implied by the basic code."""
        first = self.text.split(" ", 1)[0]
        if _ENHANCED.fullmatch(first):
            return first
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What the transport needs to hand one message to a next hop."""

    queue_id: str
    sender: str  # "" for a null sender (DSNs)
    recipients: tuple[str, ...]
    data: bytes  # exactly the stored bytes, CRLF line endings
    smtputf8: bool = False
    eightbit: bool = False
    dsn: MailParams = NO_MAIL_PARAMS  # RFC 3461 RET, ENVID: for a hop that offers DSN
    rcpt_dsn: tuple[tuple[str, RcptParams], ...] = ()  # NOTIFY, ORCPT of those that gave any


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What one attempt to deliver a message to one destination produced."""

    replies: dict[str, Reply]  # recipient address -> the reply that decides it
    remote_host: str | None = None  # "host[ip]:port" that gave the replies, if any
    site_failure: bool = False  # no hop could even start a transaction
    errors: tuple[str, ...] = field(default_factory=tuple)  # per-hop reasons, for the log
    hop_dsn: bool = False  # the hop that gave the replies offered DSN: it reports success
