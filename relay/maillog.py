"""The mail log: one grep-friendly line per event, keyed by queue ID.

Owns the wording of events operators grep for (`queued`, `rejected`,
`delivered`, `deferred`, `bounced`, `expired`), in the manner of Postfix's
maillog: `ID: event key=value, ...`. Refuses to decide anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.outcomes import Decision
    from relay.queue import Claimed

log = logging.getLogger("relay.mail")


def queued(
    queue_id: str, sender: str, recipients: Sequence[str], size: int, client: str, helo: str
) -> None:
    log.info(
        "%s: queued from=<%s>, to=<%s>, size=%d, client=%s, helo=%s",
        queue_id,
        sender,
        ">,<".join(recipients),
        size,
        client,
        helo,
    )


def rejected(client: str, stage: str, reply: str, sender: str = "", recipient: str = "") -> None:
    log.info(
        "NOQUEUE: rejected stage=%s, client=%s, from=<%s>, to=<%s>, reply=%s",
        stage,
        client,
        sender,
        recipient,
        reply,
    )


def attempt_results(
    message: Claimed, decision: Decision, now: datetime, duration: float | None = None
) -> None:
    attempt = decision.attempt
    delay = (now - message.received_at).total_seconds()
    for update in attempt.recipients:
        log.info(
            "%s: %s to=<%s>, relay=%s, delay=%.1f, attempts=%d, reply=%s",
            message.id,
            update.outcome,
            update.address,
            attempt.remote_host or "none",
            delay,
            message.attempts + (1 if attempt.counted else 0),
            update.reply,
        )
    for dsn in attempt.dsns:
        log.info("%s: sender notification %s to=<%s>", message.id, dsn.id, message.sender)
