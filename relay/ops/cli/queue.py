"""`relay queue ...`: the operator's view of the queue and the verbs that change it.

Owns the `queue` command group of SPEC "Package and commands": `list`
(mailq-like table or JSON), `show` (human, JSON or the raw stored bytes),
`stats`, `flush`, `hold`, `release`, `delete` (confirmation on a terminal) and
`bounce` (an operator's give-up: a DSN to the sender, the message leaves the
queue); their output formats, argument checks and exit codes (0 ok,
1 operational, 2 usage), and turning every database failure into one stderr
line. It checks that the database is at head revision before touching it.

Refuses to run the scheduler, to migrate the database and to write SQL: every
change goes through `queue.Queue`, every decision about a bounce through
`outcomes.decide`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from relay.core.clock import Clock, SystemClock
from relay.core.config import Config
from relay.core.model import MessageState
from relay.delivery.outcomes import decide, rules_from_config
from relay.ops.cli.common import config_option, fail, load_config
from relay.queue import db
from relay.queue.access import Queue
from relay.queue.rows import MessageView, QueueError, Selector

STATES = tuple(s.value for s in MessageState)
BOUNCE_LEASE = 300.0  # seconds an operator bounce holds its message
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")

clock: Clock = SystemClock()  # the one source of "now"; tests may replace it


# -- helpers shared by the commands ------------------------------------------


def valid_domain(name: str) -> str | None:
    """The domain as the queue stores it (lower case, no final dot), or None if malformed.

    Accepts LDH labels, internationalised labels that IDNA can encode, and
    address literals (`[192.0.2.1]`, `[IPv6:...]`).
    """
    domain = name.strip().lower().rstrip(".")
    if not domain or len(domain) > 253:
        return None
    if domain.startswith("[") and domain.endswith("]"):
        return domain if re.fullmatch(r"\[[0-9a-z:.]+\]", domain) else None
    for label in domain.split("."):
        if label.isascii():
            if not _LABEL.fullmatch(label):
                return None
            continue
        try:
            ace = label.encode("idna").decode("ascii")
        except UnicodeError:
            return None
        if not _LABEL.fullmatch(ace):
            return None
    return domain


def iso(when: datetime | None) -> str | None:
    """ISO 8601 in UTC with a `Z`, to the second; None stays None (JSON null)."""
    if when is None:
        return None
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


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


def plural(n: int, word: str = "message") -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def usage(ctx: click.Context, message: str) -> NoReturn:
    """A usage error: click prints usage and the message, exit 2."""
    raise click.UsageError(message, ctx)


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


@contextmanager
def guarded() -> Iterator[None]:
    """Every expected failure becomes one `relay: ...` line and exit 1; never a traceback."""
    try:
        yield
    except BrokenPipeError:  # `relay queue list | head`
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # pragma: no cover - odd stdout
            pass
        sys.exit(1)
    except db.DatabaseError as exc:
        fail(str(exc))
    except QueueError as exc:
        fail(f"queue error: {exc}")
    except SQLAlchemyError as exc:
        fail(f"database error: {_one_line(exc)}")
    except OSError as exc:
        fail(f"{exc.strerror or exc}")
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except Exception as exc:  # the contract: one line, never a traceback
        fail(f"unexpected error: {type(exc).__name__}: {_one_line(exc)}")


def open_queue(ctx: click.Context, config_path: str | None) -> tuple[Config, Queue]:
    """Config, then a Queue on a database at head revision, or one line and exit 1."""
    cfg = load_config(ctx, config_path)
    with guarded():
        engine = db.connect(cfg.queue.url)
        ctx.call_on_close(engine.dispose)
        _check_schema(engine)
    return cfg, Queue(engine)


def _check_schema(engine: Engine) -> None:
    url = engine.url
    # Never create an empty SQLite file from a command that only reads or edits rows.
    database = url.database if url.get_backend_name() == "sqlite" else None
    if database and database != ":memory:" and not Path(database).exists():
        fail("database not initialised: run relay db upgrade")
    rev = db.revision(engine)
    if rev.current is None:
        fail("database not initialised: run relay db upgrade")
    if rev.current != rev.head:
        fail(
            f"database schema is at revision {rev.current}, this relay needs {rev.head}: "
            "run relay db upgrade"
        )


def _domain_option(ctx: click.Context, domain: str | None) -> str:
    if domain is None:
        return ""
    checked = valid_domain(domain)
    if checked is None:
        fail(f"bad domain {domain!r}: not a domain name")
    return checked


def _report_unknown(unknown: Sequence[str]) -> None:
    for qid in unknown:
        click.echo(f"relay: unknown queue ID {qid}", err=True)


@dataclass(frozen=True, slots=True)
class Target:
    selector: Selector
    unknown: tuple[str, ...]  # IDs given that are not in the queue

    @property
    def empty(self) -> bool:
        s = self.selector
        return not (s.ids or s.domain or s.everything)


def _target(
    ctx: click.Context,
    ids: Sequence[str],
    domain: str | None,
    everything: bool,
    verb: str,
) -> tuple[Callable[[Queue], Target], str]:
    """Check the selection's syntax now (usage errors come before any database work)."""
    if everything and (ids or domain):
        usage(ctx, "--all cannot be combined with queue IDs or --domain")
    if not (ids or domain or everything):
        usage(ctx, f"nothing to {verb}: give queue IDs, --domain D or --all")
    checked = _domain_option(ctx, domain)
    wanted = tuple(dict.fromkeys(i.strip() for i in ids if i.strip()))
    if ids and not wanted:
        usage(ctx, "empty queue ID")

    def resolve(queue: Queue) -> Target:
        found = queue.existing(wanted) if wanted else set()
        known = tuple(i for i in wanted if i in found)
        unknown = tuple(i for i in wanted if i not in found)
        return Target(Selector(ids=known, domain=checked, everything=everything), unknown)

    return resolve, checked


def _finish(unknown: Sequence[str]) -> None:
    _report_unknown(unknown)
    if unknown:
        sys.exit(1)


# -- JSON and text views -----------------------------------------------------


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
    }


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))  # ASCII: safe whatever the locale


_MARK = {MessageState.ACTIVE.value: "*", MessageState.HOLD.value: "!"}
_ID_WIDTH = 28
_HEADER = (
    f"{'-Queue ID-':<{_ID_WIDTH}} {'--Size--':>8} {'--Arrival Time (UTC)--':<22} "
    "-Sender/Recipient-------"
)
_INDENT = " " * (_ID_WIDTH + 1 + 8 + 1 + 22 + 1)


def mailq(views: Sequence[MessageView]) -> str:
    """The Postfix `mailq` layout: `*` active, `!` on hold, deferred replies in brackets."""
    if not views:
        return "Mail queue is empty"
    lines = [_HEADER]
    for v in views:
        ident = v.id + _MARK.get(v.state, "")
        arrival = v.received_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        sender = v.sender or "MAILER-DAEMON"
        lines.append(f"{ident:<{_ID_WIDTH}} {v.size:>8} {arrival:<22} {sender}")
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
    lines.append("History:")
    lines.append(_history_text(history) if history else "  (no delivery attempts yet)")
    return "\n".join(lines)


def _history_text(history: Sequence[tuple[datetime, str, str, str, str]]) -> str:
    lines = []
    for at, rcpt, outcome, reply, remote in history:
        via = f" via {remote}" if remote else ""
        lines.append(f"  {human_time(at)}  <{rcpt}>  {outcome}{via}: {reply}")
    return "\n".join(lines)


# -- the commands -------------------------------------------------------------


@click.group("queue")
@config_option
@click.pass_context
def queue_group(ctx: click.Context, config_path: str | None) -> None:
    """Inspect and operate the mail queue (like mailq / postqueue / postsuper)."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    if config_path:  # `relay queue -c F list`: after `relay -c F`, before `list -c F`
        root.obj["config_path"] = config_path


@queue_group.command("list")
@config_option
@click.option("--domain", "domain", metavar="D", help="only messages for this destination domain")
@click.option("--state", "state", type=click.Choice(STATES), help="only messages in this state")
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@click.pass_context
def list_command(
    ctx: click.Context, config_path: str | None, domain: str | None, state: str | None,
    as_json: bool,
) -> None:
    """One row per queued message, like mailq (`*` active, `!` on hold)."""
    checked = _domain_option(ctx, domain)
    _, queue = open_queue(ctx, config_path)
    with guarded():
        views = queue.list(domain=checked, state=state or "")
        if as_json:
            _echo_json([message_json(v) for v in views])
        else:
            click.echo(mailq(views))


@queue_group.command("show")
@config_option
@click.argument("queue_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--raw", is_flag=True, help="write the stored message bytes exactly")
@click.pass_context
def show_command(
    ctx: click.Context, config_path: str | None, queue_id: str, as_json: bool, raw: bool
) -> None:
    """Envelope, state, per-recipient status, attempts and replies of one message."""
    if as_json and raw:
        usage(ctx, "--json and --raw are mutually exclusive")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        if raw:
            data = queue.raw(queue_id)
            if data is None:
                fail(f"unknown queue ID {queue_id}")
            sys.stdout.flush()
            sys.stdout.buffer.write(data)  # exactly the stored bytes: no decoding, no newline
            sys.stdout.buffer.flush()
            return
        view = queue.show(queue_id)
        history = queue.history(queue_id)
        if view is None:
            if history and not as_json:  # gone, but the delivery log remembers it
                click.echo(f"{queue_id} is no longer queued. Delivery log:")
                click.echo(_history_text(history))
            fail(f"unknown queue ID {queue_id}")
        if as_json:
            obj = message_json(view)
            obj["destination"] = view.destination
            obj["client_address"] = view.client_address
            obj["history"] = [
                {"at": iso(at), "recipient": rcpt, "outcome": outcome, "reply": reply,
                 "remote_host": remote}
                for at, rcpt, outcome, reply, remote in history
            ]
            _echo_json(obj)
        else:
            click.echo(show_text(view, history, clock.now()))


@queue_group.command("stats")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
@click.pass_context
def stats_command(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Counts by state and by destination domain, and the oldest message's age."""
    _, queue = open_queue(ctx, config_path)
    with guarded():
        stats = queue.stats()
        now = clock.now()
        by_state = {state: stats.by_state.get(state, 0) for state in STATES}
        by_state.update({k: v for k, v in stats.by_state.items() if k not in by_state})
        by_domain = dict(sorted(stats.by_domain.items(), key=lambda kv: (-kv[1], kv[0])))
        oldest = (
            max(0, int((now - stats.oldest_received_at).total_seconds()))
            if stats.oldest_received_at is not None
            else 0
        )
        if as_json:
            _echo_json({
                "total": stats.total,
                "by_state": by_state,
                "by_domain": by_domain,
                "oldest_age_seconds": oldest,
            })
            return
        click.echo(f"messages: {stats.total}")
        for state, n in by_state.items():
            click.echo(f"  {state + ':':<10}{n:>8}")
        click.echo("by domain:")
        if not by_domain:
            click.echo("  (none)")
        width = max((len(d) for d in by_domain), default=0) + 1
        for name, n in by_domain.items():
            click.echo(f"  {name + ':':<{width}} {n:>8}")
        if stats.oldest_received_at is None:
            click.echo("oldest: -")
        else:
            click.echo(f"oldest: {human_time(stats.oldest_received_at)} ({span(oldest)} ago)")


def _selection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--all", "everything", is_flag=True, help="every message in the queue")(
        func
    )
    func = click.option("--domain", "domain", metavar="D",
                        help="every message for this destination domain")(func)
    return click.argument("ids", nargs=-1, metavar="[ID]...")(func)


@queue_group.command("flush")
@config_option
@_selection_options
@click.pass_context
def flush_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Make deferred messages due now (a flushed domain counts as up again)."""
    resolve, _ = _target(ctx, ids, domain, everything, "flush")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        target = resolve(queue)
        n = 0 if target.empty else queue.flush(target.selector, clock.now())
        click.echo(f"{plural(n)} flushed")
    _finish(target.unknown)


@queue_group.command("hold")
@config_option
@_selection_options
@click.pass_context
def hold_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Stop delivery attempts (state `hold`) until released."""
    resolve, _ = _target(ctx, ids, domain, everything, "hold")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        target = resolve(queue)
        n = 0 if target.empty else queue.hold(target.selector)
        click.echo(f"{plural(n)} held")
    _finish(target.unknown)


@queue_group.command("release")
@config_option
@_selection_options
@click.pass_context
def release_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Put held messages back to `deferred`, due now."""
    resolve, _ = _target(ctx, ids, domain, everything, "release")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        target = resolve(queue)
        n = 0 if target.empty else queue.release(target.selector, clock.now())
        click.echo(f"{plural(n)} released")
    _finish(target.unknown)


def interactive() -> bool:
    """True when a person can answer a question (stdin and stderr are terminals)."""
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@queue_group.command("delete")
@config_option
@_selection_options
@click.option("--yes", "-y", "yes", is_flag=True, help="do not ask for confirmation")
@click.pass_context
def delete_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool, yes: bool,
) -> None:
    """Remove messages from the queue for good (asks unless --yes)."""
    resolve, checked = _target(ctx, ids, domain, everything, "delete")
    ask = not yes
    if ask and not interactive():
        usage(ctx, "not a terminal: add --yes to delete without confirmation")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        target = resolve(queue)
        if target.empty:
            click.echo(f"{plural(0)} deleted")
            _finish(target.unknown)
            return
        if ask:
            if everything:
                count = queue.stats().total
            else:
                chosen = set(target.selector.ids)
                if checked:
                    chosen |= {v.id for v in queue.list(domain=checked)}
                count = len(chosen)
            if count == 0:
                click.echo(f"{plural(0)} deleted")
                _finish(target.unknown)
                return
            what = "the whole queue" if everything else plural(count)
            if not click.confirm(f"Delete {what} for good?", default=False, err=True):
                fail("nothing deleted")
        n = queue.delete(target.selector)
        click.echo(f"{plural(n)} deleted")
    _finish(target.unknown)


@queue_group.command("bounce")
@config_option
@click.argument("ids", nargs=-1, metavar="ID...")
@click.pass_context
def bounce_command(ctx: click.Context, config_path: str | None, ids: tuple[str, ...]) -> None:
    """Give up now: return each message to its sender with a DSN and drop it."""
    wanted = tuple(dict.fromkeys(i.strip() for i in ids if i.strip()))
    if not wanted:
        usage(ctx, "nothing to bounce: give queue IDs")
    cfg, queue = open_queue(ctx, config_path)
    rules = rules_from_config(cfg)
    owner = f"{cfg.node.hostname}/cli-{os.getpid()}"
    problems = 0
    with guarded():
        now = clock.now()
        found = queue.existing(wanted)
        claimed = {c.id: c for c in queue.claim_ids(
            [i for i in wanted if i in found], owner, now, BOUNCE_LEASE)}
        for qid in wanted:
            if qid not in found:
                click.echo(f"relay: unknown queue ID {qid}", err=True)
                problems += 1
            elif qid not in claimed:
                click.echo(
                    f"relay: {qid} is being delivered right now; cannot bounce it "
                    "until the attempt ends", err=True)
                problems += 1
        for qid, message in claimed.items():
            try:
                original = queue.body(message.body_id)
                decision = decide(rules, message, owner, now, report=None, original=original,
                                  operator_bounce=True)
                queue.record(decision.attempt)
            except (QueueError, SQLAlchemyError, ValueError) as exc:
                _give_back(queue, qid, owner, now)
                click.echo(f"relay: {qid}: not bounced: {_one_line(exc)}", err=True)
                problems += 1
                continue
            dsns = decision.attempt.dsns
            if dsns:
                click.echo(f"{qid}: returned to <{message.sender}> (DSN queued as {dsns[0].id})")
            elif not message.sender or message.is_dsn:
                click.echo(f"{qid}: removed; null sender, so no DSN")
            else:
                click.echo(f"{qid}: removed")
    if problems:
        sys.exit(1)


def _give_back(queue: Queue, qid: str, owner: str, now: datetime) -> None:
    with suppress(QueueError, SQLAlchemyError):  # else its lease runs out and serve recovers it
        queue.unclaim([qid], owner, now)
