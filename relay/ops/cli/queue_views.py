"""How `relay queue` prints: the mailq table, `show`'s text, JSON objects, times and sizes.

Owns the output formats of SPEC "Package and commands" for the queue
commands (keys, column layout, time and span notation). Refuses to read the
queue or to decide anything: it turns views into text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from relay.core.clock import iso
from relay.core.maillog import span
from relay.core.model import MessageState

if TYPE_CHECKING:
    from relay.queue.rows import MessageView


def human_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def plural(n: int, word: str = "message") -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _next_attempt(view: MessageView) -> datetime | None:
    """A held message has no next attempt, whatever the row remembers."""
    return None if view.state == MessageState.HOLD.value else view.next_attempt_at


def message_json(view: MessageView) -> dict[str, Any]:
    return {
        "id": view.id,
        "state": view.state,
        "sender": view.sender,
        "size": view.size,
        "received_at": iso(view.received_at),
        "next_attempt_at": iso(_next_attempt(view)),
        "attempts": view.attempts,
        "last_error": view.last_error,
        "recipients": [
            {
                "address": r.address,
                "status": r.status,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
            }
            for r in view.recipients
        ],
        "node": view.node,  # SPEC: the id of the node delivering it now, else null
    }


def echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))  # ASCII: safe whatever the locale


_MARK = {MessageState.ACTIVE.value: "*", MessageState.HOLD.value: "!"}
_ID_WIDTH = 28
_TIME_WIDTH = 22
_HEADER = (
    f"{'-Queue ID-':<{_ID_WIDTH}} {'--Size--':>8} {'--Arrival Time (UTC)--':<{_TIME_WIDTH}} "
    f"{'--Next Attempt (UTC)--':<{_TIME_WIDTH}} -Sender/Recipient-------"
)
_INDENT = " " * (_ID_WIDTH + 1 + 8 + 1 + _TIME_WIDTH + 1 + _TIME_WIDTH + 1)


def _next_attempt_cell(view: MessageView, now: datetime) -> str:
    """When the message is tried next, in one word or one time."""
    if view.state == MessageState.ACTIVE.value:
        return "running"
    if view.state == MessageState.HOLD.value:
        return "on hold"
    if view.next_attempt_at is None:
        return "after the probe"  # parked: its destination's probe is running
    if view.next_attempt_at <= now:
        return "due now"
    return view.next_attempt_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def mailq(views: Sequence[MessageView], now: datetime) -> str:
    """The Postfix `mailq` layout plus when each message is tried next: `*`
    active, `!` on hold, deferred replies in brackets."""
    if not views:
        return "Mail queue is empty"
    lines = [_HEADER]
    for v in views:
        ident = v.id + _MARK.get(v.state, "")
        arrival = v.received_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        sender = v.sender or "MAILER-DAEMON"
        lines.append(f"{ident:<{_ID_WIDTH}} {v.size:>8} {arrival:<{_TIME_WIDTH}} "
                     f"{_next_attempt_cell(v, now):<{_TIME_WIDTH}} {sender}")
        for r in v.recipients:
            if r.status == "deferred":
                reason = r.last_reply or v.last_error
                if reason:
                    lines.append(f"{_INDENT[:-8]}({reason})")
            suffix = "" if r.status in ("queued", "deferred") else f"  [{r.status}]"
            lines.append(f"{_INDENT}{r.address}{suffix}")
        lines.append("")
    total = sum(v.size for v in views)
    kbytes = math.ceil(total / 1024)
    lines.append(f"-- {kbytes} Kbytes in {len(views)} Request{'' if len(views) == 1 else 's'}.")
    return "\n".join(lines)


def _next_attempt_text(view: MessageView, now: datetime) -> str:
    if view.state == MessageState.ACTIVE.value:
        return "now (a delivery attempt is running)"
    if view.state == MessageState.HOLD.value:
        return "none: on hold (relay queue release to resume)"
    if view.next_attempt_at is None:
        return f"when {view.destination} answers again (destination down)"
    if view.next_attempt_at <= now:
        return f"due now (since {human_time(view.next_attempt_at)})"
    wait = (view.next_attempt_at - now).total_seconds()
    return f"{human_time(view.next_attempt_at)} (in {span(wait)})"


def show_text(
    view: MessageView, history: Sequence[tuple[datetime, str, str, str, str]], now: datetime
) -> str:
    age = (now - view.received_at).total_seconds()
    received = f"{human_time(view.received_at)} ({span(age)} ago)"
    if view.client_address:
        received += f" from {view.client_address}"
    rows = [
        ("Queue ID", view.id),
        ("State", view.state),
        ("Sender", f"<{view.sender}>"),
        ("Destination", view.destination),
        ("Size", f"{view.size} bytes"),
        ("Received", received),
        ("SPF", view.spf or "not evaluated"),
        ("Attempts", str(view.attempts)),
        ("Next attempt", _next_attempt_text(view, now)),
    ]
    if view.last_error:
        rows.append(("Last error", view.last_error))
    lines = [f"{label + ':':<14}{value}" for label, value in rows]
    lines.append("Recipients:")
    width = max((len(r.address) for r in view.recipients), default=0) + 2
    for r in view.recipients:
        line = f"  <{r.address}>".ljust(width + 4) + f"{r.status:<10} attempts {r.attempts}"
        if r.last_reply:
            line += f"  {r.last_reply}"
        lines.append(line)
        dsn = [f"NOTIFY={','.join(r.notify)}"] if r.notify is not None else []
        dsn += [f"ORCPT={r.orcpt}"] if r.orcpt is not None else []
        if dsn:
            lines.append("    " + " ".join(dsn))
    lines.append("History:")
    lines.append(history_text(history) if history else "  (no delivery attempts yet)")
    return "\n".join(lines)


def history_text(history: Sequence[tuple[datetime, str, str, str, str]]) -> str:
    lines = []
    for at, rcpt, outcome, reply, remote in history:
        via = f" via {remote}" if remote else ""
        lines.append(f"  {human_time(at)}  <{rcpt}>  {outcome}{via}: {reply}")
    return "\n".join(lines)
