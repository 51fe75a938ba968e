"""`relay queue flush|hold|release|delete|bounce`: the verbs that change the queue.

Owns these commands' arguments, confirmations and messages (SPEC "Package
and commands"), and waking the running relays once a change makes mail due
now (flush, release, a bounce that queued a DSN). Refuses SQL (every change
goes through `queue.Queue`) and bounce decisions (`outcomes.decide`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from relay.ops.cli import queue_select as sel
from relay.ops.cli.common import config_option, fail
from relay.ops.cli.queue_select import guarded, open_queue, queue_ids_argument, usage, wake_relays
from relay.ops.cli.queue_views import plural

if TYPE_CHECKING:
    from relay.queue.access import Queue

BOUNCE_LEASE = 300.0  # seconds an operator bounce holds its message


def _selection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--all", "everything", is_flag=True, help="every message in the queue")(
        func
    )
    func = click.option("--domain", "domain", metavar="D",
                        help="every message for this destination domain")(func)
    return click.argument("ids", nargs=-1, metavar="[ID]...", callback=queue_ids_argument)(func)


@click.command("flush")
@config_option
@_selection_options
@click.pass_context
def flush_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Make deferred messages due now (a flushed domain counts as up again)."""
    resolve, _ = sel.target(ctx, ids, domain, everything, "flush")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        target = resolve(queue)
        n = 0 if target.empty else queue.flush(target.selector, sel.clock.now())
        wake_relays(queue, n)
        click.echo(f"{plural(n)} flushed")
    sel.finish(target.unknown)


@click.command("hold")
@config_option
@_selection_options
@click.pass_context
def hold_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Stop delivery attempts (state `hold`) until released."""
    resolve, _ = sel.target(ctx, ids, domain, everything, "hold")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        target = resolve(queue)
        n = 0 if target.empty else queue.hold(target.selector)
        click.echo(f"{plural(n)} held")
    sel.finish(target.unknown)


@click.command("release")
@config_option
@_selection_options
@click.pass_context
def release_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Put held messages back to `deferred`, due now."""
    resolve, _ = sel.target(ctx, ids, domain, everything, "release")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        target = resolve(queue)
        n = 0 if target.empty else queue.release(target.selector, sel.clock.now())
        wake_relays(queue, n)
        click.echo(f"{plural(n)} released")
    sel.finish(target.unknown)


def interactive() -> bool:
    """True when a person can answer a question (stdin and stderr are terminals)."""
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@click.command("delete")
@config_option
@_selection_options
@click.option("--yes", "-y", "yes", is_flag=True, help="do not ask for confirmation")
@click.pass_context
def delete_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool, yes: bool,
) -> None:
    """Remove messages from the queue for good (asks unless --yes)."""
    resolve, checked = sel.target(ctx, ids, domain, everything, "delete")
    ask = not yes
    if ask and not interactive():
        usage(ctx, "not a terminal: add --yes to delete without confirmation")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        target = resolve(queue)
        if target.empty:
            click.echo(f"{plural(0)} deleted")
            sel.finish(target.unknown)
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
                sel.finish(target.unknown)
                return
            what = "the whole queue" if everything else plural(count)
            if not click.confirm(f"Delete {what} for good?", default=False, err=True):
                fail("nothing deleted")
        n = queue.delete(target.selector)
        click.echo(f"{plural(n)} deleted")
    sel.finish(target.unknown)


@click.command("bounce")
@config_option
@click.argument("ids", nargs=-1, metavar="ID...", callback=queue_ids_argument)
@click.pass_context
def bounce_command(ctx: click.Context, config_path: str | None, ids: tuple[str, ...]) -> None:
    """Give up now: return each message to its sender with a DSN and drop it."""
    wanted = tuple(dict.fromkeys(i.strip() for i in ids if i.strip()))
    if not wanted:
        usage(ctx, "nothing to bounce: give queue IDs")
    cfg, queue = open_queue(ctx, config_path)
    from sqlalchemy.exc import SQLAlchemyError

    from relay.delivery import outcomes
    from relay.queue.rows import QueueError

    rules = outcomes.rules_from_config(cfg)
    owner = f"{cfg.node.hostname}/cli-{os.getpid()}"
    problems = 0
    queued_dsns = 0
    with guarded():
        now = sel.clock.now()
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
                decision = outcomes.decide(rules, message, owner, now, report=None,
                                           original=original, operator_bounce=True)
                queue.record(decision.attempt)
            except (QueueError, SQLAlchemyError, ValueError) as exc:
                _give_back(queue, qid, owner, now)
                click.echo(f"relay: {qid}: not bounced: {sel.one_line(exc)}", err=True)
                problems += 1
                continue
            dsns = decision.attempt.dsns
            queued_dsns += len(dsns)
            if dsns:
                click.echo(f"{qid}: returned to <{message.sender}> (DSN queued as {dsns[0].id})")
            elif not message.sender or message.is_dsn:
                click.echo(f"{qid}: removed; null sender, so no DSN")
            else:
                click.echo(f"{qid}: removed")
        wake_relays(queue, queued_dsns)
    if problems:
        sys.exit(1)


def _give_back(queue: Queue, qid: str, owner: str, now: datetime) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from relay.queue.rows import QueueError

    with suppress(QueueError, SQLAlchemyError):  # else its lease runs out and serve recovers it
        queue.unclaim([qid], owner, now)


VERBS = (flush_command, hold_command, release_command, delete_command, bounce_command)
