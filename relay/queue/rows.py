"""The queue's rows as plain values: what goes in, what comes out.

Owns the frozen types every stage hands the queue or gets back from it (a
new message, a claim, an attempt's record, a view for the operator), the
queue ID and the one error type. Refuses SQL and I/O: nothing here imports
SQLAlchemy, so delivery and SMTP code can use these without the database.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from ulid import ULID

from relay.core.address import destination_key
from relay.core.destination import AttemptOutcome
from relay.core.dsnparams import NO_MAIL_PARAMS, NO_RCPT_PARAMS, MailParams, RcptParams
from relay.core.model import UNCERTAIN_PREFIX, Outcome, RecipientStatus
from relay.core.recipients import Learned


class QueueError(Exception):
    """A storage failure; the caller answers 451 or reports one line."""


def new_queue_id() -> str:
    """Queue IDs are ULIDs: unique across relays sharing a queue, sorted by arrival."""
    return str(ULID())


def domain_of(address: str) -> str:
    return destination_key(address.rpartition("@")[2])


@dataclass(frozen=True, slots=True)
class NewMessage:
    """An accepted message, ready to store. `id` is the queue ID given to the client."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    received_at: datetime
    client_address: str = ""
    client_helo: str = ""
    smtputf8: bool = False
    eightbit: bool = False
    is_dsn: bool = False
    dsn: MailParams = NO_MAIL_PARAMS  # RFC 3461 RET, ENVID
    rcpt_dsn: tuple[tuple[str, RcptParams], ...] = ()  # NOTIFY, ORCPT of those that gave any
    spf: str | None = None  # SPF result at MAIL FROM; None: not evaluated

    def split_by_destination(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(queue id, destination, recipients): one queue entry per recipient domain.

        The first entry keeps the client's queue ID; further ones add ".2", ".3".
        """
        groups: dict[str, list[str]] = {}
        for rcpt in self.recipients:
            groups.setdefault(domain_of(rcpt), []).append(rcpt)
        return [
            (self.id if n == 1 else f"{self.id}.{n}", dest, tuple(rcpts))
            for n, (dest, rcpts) in enumerate(groups.items(), start=1)
        ]


@dataclass(frozen=True, slots=True)
class PendingRecipient:
    id: int
    address: str
    status: RecipientStatus
    attempts: int
    params: RcptParams = NO_RCPT_PARAMS  # its RFC 3461 NOTIFY and ORCPT


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message leased to one scheduler for one attempt.

    The lease is `(owner, lease_until)`: an attempt is recorded only while
    the message still carries this very lease (see `Attempt`). A node's
    heartbeat keeps its leases past `lease_until` (`nodes.lapsed`).
    """

    id: str
    body_id: str
    destination: str
    sender: str
    size: int
    received_at: datetime
    smtputf8: bool
    eightbit: bool
    is_dsn: bool
    attempts: int
    delay_warned: bool
    recipients: tuple[PendingRecipient, ...]
    lease_until: datetime
    next_attempt_at: datetime | None = None  # as it was before the claim (None: parked)
    last_error: str = ""
    taken_over: bool = False  # from a node that stopped renewing its lease
    probe: bool = False  # its destination is down: this attempt probes it for the cluster
    dsn: MailParams = NO_MAIL_PARAMS  # RFC 3461 RET, ENVID
    spf: str | None = None  # SPF result at MAIL FROM; None: not evaluated


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    recipient_id: int
    address: str
    status: RecipientStatus
    reply: str
    outcome: Outcome  # for the delivery log (EXPIRED: bounced unattempted)


@dataclass(frozen=True, slots=True)
class DestinationUpdate:
    """What an attempt tells about its destination, for the state machine."""

    name: str
    outcome: AttemptOutcome
    retry_at: datetime | None = None  # the next probe, should it go down
    error: str = ""


@dataclass(frozen=True, slots=True)
class Attempt:
    """Everything one attempt changes, applied in one transaction.

    `owner` and `lease_until` name the claim it comes from: should the
    message carry another lease by then (the claim expired and another
    scheduler took it over), the record is refused as stale.
    """

    message_id: str
    owner: str
    lease_until: datetime
    at: datetime
    recipients: tuple[RecipientUpdate, ...]
    next_attempt_at: datetime | None  # when still pending; None = parked on its destination
    last_error: str = ""
    remote_host: str = ""
    dsns: tuple[NewMessage, ...] = ()
    destination: DestinationUpdate | None = None  # None: no word on the destination
    counted: bool = True  # False for an expiry or operator bounce: no attempt was made
    delay_warned: bool = False
    learned: tuple[Learned, ...] = ()  # what the next hop's replies taught (verify = learned)
    suppressed: tuple[str, ...] = ()  # SPF result of each DSN withheld (bounces.send_to)


class Recorded(enum.StrEnum):
    """What became of a write handed to the queue."""

    STORED = "stored"  # committed
    GONE = "gone"  # the message was no longer there (an operator deleted it)
    STALE = "stale"  # refused: the message's lease is no longer this attempt's claim


@dataclass(frozen=True, slots=True)
class RecipientView:
    address: str
    status: str
    attempts: int
    last_reply: str
    notify: tuple[str, ...] | None = None  # RFC 3461 NOTIFY words; None: not given
    orcpt: str | None = None  # RFC 3461 ORCPT as given

    @property
    def uncertain(self) -> bool:
        """The latest attempt may have delivered: no reply came after the final dot."""
        return self.last_reply.startswith(UNCERTAIN_PREFIX)


@dataclass(frozen=True, slots=True)
class MessageView:
    id: str
    state: str
    sender: str
    size: int
    received_at: datetime
    next_attempt_at: datetime | None
    attempts: int
    last_error: str
    destination: str
    client_address: str
    recipients: tuple[RecipientView, ...] = field(default_factory=tuple)
    node: str | None = None  # the node (lease owner) delivering it now, if active
    spf: str | None = None  # SPF result at MAIL FROM; None: not evaluated


@dataclass(frozen=True, slots=True)
class DestinationView:
    """A `destinations` row as the operator sees it (a destination never found
    down has none)."""

    name: str
    up: bool
    down_since: datetime | None  # when it went down; None while up
    retry_at: datetime | None  # its next probe while down; None while one runs
    failures: int  # consecutive backoff steps
    last_error: str


@dataclass(frozen=True, slots=True)
class Stats:
    total: int
    by_state: dict[str, int]
    by_domain: dict[str, int]
    oldest_received_at: datetime | None


@dataclass(frozen=True, slots=True)
class Selector:
    """Which messages an operator verb targets: IDs, a domain, or all."""

    ids: tuple[str, ...] = ()
    domain: str = ""
    everything: bool = False
