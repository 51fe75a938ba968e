"""Known recipients: what the next hop taught us about addresses, as values.

Owns the pure rules of SPEC "Knowing recipients while the primary is down":
the key an address is known by (local part lower-cased, domain in A-label
form, as the duplicate check of RCPT does), which of a next hop's replies
teach something (`2xx`: valid; `5xx` with enhanced code `5.1.x`: invalid;
anything else: nothing) and when knowledge has expired (its domain's TTL
after it was last seen). Refuses storage and I/O: the queue stores these
values, the accept side looks them up.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from relay.core.address import destination_key
from relay.core.model import Reply

_ADDRESS_STATUS = re.compile(r"5\.1\.\d{1,3}")
_SENDER = frozenset({"5.1.7", "5.1.8"})  # bad sender address, bad sender's system


class KnownState(enum.StrEnum):
    VALID = "valid"  # the next hop accepted it (2xx)
    INVALID = "invalid"  # the next hop refused it with 5.1.x: no such mailbox


class Source(enum.StrEnum):
    DELIVERY = "delivery"  # a reply during a delivery
    CALLOUT = "callout"  # a probe at RCPT time
    IMPORT = "import"  # `relay recipients import`


def recipient_key(address: str) -> str:
    """`Bob@Bücher.test` -> `bob@xn--bcher-kva.test`: nearly every server
    treats local parts case-insensitively, so knowledge is kept that way."""
    local, _, domain = address.rpartition("@")
    return f"{local.lower()}@{destination_key(domain)}"


def learned_from(reply: Reply) -> KnownState | None:
    """What one next hop's reply to a recipient teaches; None: nothing.

    Only an explicit enhanced code `5.1.x` means the mailbox does not exist:
    a bare 550 may be a policy refusal of the message, not of the address;
    5.1.7 and 5.1.8 speak of the sender (RFC 3463), never the recipient.
    """
    if 200 <= reply.code < 300:
        return KnownState.VALID
    status = reply.text.split(" ", 1)[0]
    if 500 <= reply.code < 600 and _ADDRESS_STATUS.fullmatch(status) and status not in _SENDER:
        return KnownState.INVALID
    return None


@dataclass(frozen=True, slots=True)
class Learned:
    """One address's state as a delivery (or an import) found it."""

    address: str  # as seen
    state: KnownState
    source: Source = Source.DELIVERY

    @property
    def key(self) -> str:
        return recipient_key(self.address)

    @property
    def domain(self) -> str:
        return self.key.rpartition("@")[2]


@dataclass(frozen=True, slots=True)
class Ttl:
    """How long knowledge lasts after an address was last seen, per state."""

    valid: float  # seconds
    invalid: float

    def expired(self, state: KnownState, last_seen_at: datetime, now: datetime) -> bool:
        seconds = self.valid if state is KnownState.VALID else self.invalid
        return now - last_seen_at >= timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class KnownRecipient:
    """A stored row of knowledge, for `relay recipients list` and the accept side."""

    address: str
    key: str
    domain: str
    state: KnownState
    source: Source
    learned_at: datetime  # when it came to be in this state
    last_seen_at: datetime  # when a reply (or an import) last confirmed it
