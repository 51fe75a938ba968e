"""The mail log: one grep-friendly line per event, keyed by queue ID.

Owns the events operators grep for: `queued`, `rejected`, `attempt`,
`delivered`, `deferred`, `uncertain` (no reply after the final dot: retried),
`bounced`, `expired` (and `dsn` when a sender
notification is queued, `bounce suppressed: spf=R` when `bounces.send_to`
withholds it), each with the client IP, sender, recipient, next
hop, remote reply and delay where they apply; what an operator did to a
message (`held by operator`, ...); and a destination going down or coming
back (`destination D is down: ...`, `destination D is up again after ...`);
and each callout probe (`callout <addr> via host[ip]:port: valid (250 ...)`).
Text in the manner of Postfix's maillog (`ID: event key=value, ...`) by
default; one JSON object per line with `[log] format = "json"`. Refuses to
decide anything: callers say when an event happened.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from relay.core.destination import AttemptOutcome
from relay.core.model import RecipientStatus

if TYPE_CHECKING:
    from relay.delivery.outcomes import Decision
    from relay.queue.rows import Claimed

log = logging.getLogger("relay.mail")

NOQUEUE = "NOQUEUE"  # Postfix's word for "rejected before a queue ID existed"


def _emit(event: str, queue_id: str, **fields: Any) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    text = ", ".join(f"{key}={_text(value)}" for key, value in fields.items())
    log.info("%s: %s%s", queue_id, event, f" {text}" if text else "",
             extra={"mail_event": {"event": event, "id": queue_id, **fields}})


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _addr(address: str) -> str:
    return f"<{address}>"


def queued(queue_id: str, sender: str, recipients: Sequence[str], size: int, client: str,
           helo: str) -> None:
    _emit("queued", queue_id, client=client, helo=helo, **{"from": _addr(sender)},
          to=",".join(_addr(r) for r in recipients), nrcpt=len(recipients), size=size)


def rejected(client: str, stage: str, reply: str, sender: str = "", recipient: str = "") -> None:
    _emit("rejected", NOQUEUE, client=client, stage=stage, **{"from": _addr(sender)},
          to=_addr(recipient), reply=reply)


def attempt(message: Claimed, next_hop: str) -> None:
    _emit("attempt", message.id, **{"from": _addr(message.sender)},
          to=",".join(_addr(r.address) for r in message.recipients),
          destination=message.destination, next_hop=next_hop or "MX",
          attempts=message.attempts + 1)


def attempt_results(message: Claimed, decision: Decision, now: datetime,
                    duration: float | None = None) -> None:
    """One line per recipient: `delivered`, `deferred`, `uncertain`, `bounced` or `expired`."""
    result = decision.attempt
    delay = (now - message.received_at).total_seconds()
    for update in result.recipients:
        fields: dict[str, Any] = {
            "from": _addr(message.sender), "to": _addr(update.address),
            "relay": result.remote_host or "none", "delay": delay,
            "attempts": message.attempts + (1 if result.counted else 0),
        }
        if duration is not None:
            fields["duration"] = duration
        if update.status is RecipientStatus.DEFERRED:
            if result.next_attempt_at is not None:
                fields["next_attempt"] = result.next_attempt_at.isoformat()
            elif result.destination is not None and result.destination.retry_at is not None:
                # parked: the destination's next probe is its next chance
                fields["next_attempt"] = result.destination.retry_at.isoformat()
            elif decision.outcome is AttemptOutcome.SITE_FAILURE:
                fields["next_attempt"] = "when the destination answers"
        fields["reply"] = update.reply
        _emit(update.outcome, message.id, **fields)
    for dsn in result.dsns:
        if b"\r\nAction: relayed\r\n" in dsn.data:  # RFC 3461 NOTIFY=SUCCESS, no DSN next hop
            kind = "relayed"
        else:
            kind = "delayed" if not any(u.status.final for u in result.recipients) else "failed"
        _emit("dsn", message.id, to=_addr(message.sender), dsn_id=dsn.id, kind=kind)
    bounces_suppressed(message, result.suppressed)


def delay_warning(message: Claimed, dsn_id: str) -> None:
    _emit("dsn", message.id, to=_addr(message.sender), dsn_id=dsn_id, kind="delayed")


def bounces_suppressed(message: Claimed, results: Sequence[str]) -> None:
    """`ID: bounce suppressed: spf=fail, to=<sender>`, once per DSN withheld."""
    for result in results:
        if log.isEnabledFor(logging.INFO):
            log.info("%s: bounce suppressed: spf=%s, to=%s", message.id, result,
                     _addr(message.sender), extra={"mail_event": {
                         "event": "bounce suppressed", "id": message.id, "spf": result,
                         "to": _addr(message.sender)}})


OPERATOR_ACTIONS = ("held", "released", "flushed", "deleted", "bounced", "requeued")


def operator(action: str, queue_ids: Sequence[str], user: str = "") -> None:
    """`ID: held by operator`, one line per message: an operator's word is on
    record, so a deleted message does not look lost."""
    if action not in OPERATOR_ACTIONS:
        raise ValueError(f"unknown operator action {action!r}")
    fields = {"user": user} if user else {}
    for queue_id in queue_ids:
        _emit(f"{action} by operator", queue_id, **fields)


def destination_down(destination: str, reason: str) -> None:
    """Once per transition, when a destination's next hops all fail."""
    _destination("destination down", f"destination {destination} is down: {reason}",
                 destination=destination, reason=reason)


def destination_up(destination: str, down_for: float | None) -> None:
    """Once per transition, when a down destination answers again."""
    after = "an unknown time" if down_for is None else span(down_for)
    _destination("destination up", f"destination {destination} is up again after {after}",
                 destination=destination, down_seconds=None if down_for is None else
                 int(max(0.0, down_for)))


def callout(address: str, host: str, result: str, reply: str) -> None:
    """One probe at RCPT time (`verify = "callout"`): who was asked, and what came of it."""
    _destination("callout", f"callout {_addr(address)} via {host}: {result} ({reply})",
                 to=_addr(address), relay=host, result=result, reply=reply)


def _destination(event: str, text: str, **fields: Any) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info("%s", text, extra={"mail_event": {"event": event, "message": text, **fields}})


def span(seconds: float) -> str:
    """`2d 3h`, `4h`, `6m 7s`, `8s`: the largest unit and the next one when not zero."""
    seconds = max(0, int(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (unit, size) in enumerate(units):
        if seconds >= size or unit == "s":
            text = f"{seconds // size}{unit}"
            if i + 1 < len(units):
                small, small_size = units[i + 1]
                if rest := (seconds % size) // small_size:
                    text += f" {rest}{small}"
            return text
    raise AssertionError("unreachable")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; mail events carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = getattr(record, "mail_event", None)
        if event is not None:
            payload.update(event)
        else:
            payload["message"] = record.getMessage()
        if record.exc_info:
            payload["error"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def to_stderr(level: str = "INFO", json_lines: bool = False) -> Iterator[None]:
    """The mail log on stderr while a `relay queue` command runs, as `serve`
    writes it: an operator's actions are on record where the operator looks
    (Postfix's postsuper logs to syslog); the root logger is left alone."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    previous = log.level
    log.addHandler(handler)
    log.setLevel(level.upper())
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)


def setup(level: str = "INFO", json_lines: bool = False) -> None:
    """Send every log line (mail events included) to stderr, as text or JSON."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's own chatter
    logging.getLogger("alembic").setLevel(logging.WARNING)  # service logs the revision
