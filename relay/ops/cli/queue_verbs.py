"""`relay queue flush|hold|release|requeue|delete|bounce`: the verbs that change the queue.

Owns these commands' arguments, confirmations and messages (SPEC "Package
and commands", "Operating it day to day"): the mail log line per message
changed (`held by operator`, ...), `no queued message for domain D` when a
domain selects nothing, and waking the running relays once a change makes
mail due now (flush, release, requeue, a bounce that queued a DSN). Refuses
SQL (every change goes through `queue.Queue`) and bounce decisions
(`outcomes.decide`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from relay.core import maillog
from relay.ops.cli import queue_select as sel
from relay.ops.cli.common import config_option, fail
from relay.ops.cli.queue_select import guarded, open_queue, queue_ids_argument, usage, wake_relays
from relay.ops.cli.queue_views import plural

if TYPE_CHECKING:
    from relay.queue.access import Queue
    from relay.queue.rows import Selector

BOUNCE_LEASE = 300.0  # seconds an operator bounce holds its message


def _selection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--all", "everything", is_flag=True, help="every message in the queue")(
        func
    )
    func = click.option("--domain", "domain", metavar="D",
                        help="every message for this destination domain")(func)
    return click.argument("ids", nargs=-1, metavar="[ID]...", callback=queue_ids_argument)(func)


def _change(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool, verb: str, done: str, change: Callable[[Queue, Selector], list[str]],
    wake: bool = False,
) -> None:
    """Select, change, log each changed ID, print the count (or why none)."""
    resolve, checked = sel.target(ctx, ids, domain, everything, verb)
    cfg, queue = open_queue(ctx, config_path)
    with guarded(), sel.operator_log(cfg):
        target = resolve(queue)
        changed = [] if target.empty else change(queue, target.selector)
        maillog.operator(done, changed, sel.operator_name())
        if wake:
            wake_relays(queue, len(changed))
        note = None if changed else sel.nothing_for_domain(cfg, queue, domain, checked)
        click.echo(note or f"{plural(len(changed))} {done}")
    sel.finish(target.unknown)


@click.command("flush")
@config_option
@_selection_options
@click.pass_context
def flush_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Make deferred messages due now (a flushed domain counts as up again)."""
    _change(ctx, config_path, ids, domain, everything, "flush", "flushed",
            lambda queue, chosen: queue.flush(chosen, sel.clock.now()), wake=True)


@click.command("hold")
@config_option
@_selection_options
@click.pass_context
def hold_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Stop delivery attempts (state `hold`) until released."""
    _change(ctx, config_path, ids, domain, everything, "hold", "held",
            lambda queue, chosen: queue.hold(chosen))


@click.command("release")
@config_option
@_selection_options
@click.pass_context
def release_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Put held messages back to `deferred`, due now."""
    _change(ctx, config_path, ids, domain, everything, "release", "released",
            lambda queue, chosen: queue.release(chosen, sel.clock.now()), wake=True)


@click.command("requeue")
@config_option
@_selection_options
@click.pass_context
def requeue_command(
    ctx: click.Context, config_path: str | None, ids: tuple[str, ...], domain: str | None,
    everything: bool,
) -> None:
    """Route messages afresh, due now, attempts and backoff reset (postsuper -r).

    Their lifetime is unchanged; a held message stays held; one being
    delivered right now is left to its attempt.
    """
    _change(ctx, config_path, ids, domain, everything, "requeue", "requeued",
            lambda queue, chosen: queue.requeue(chosen, sel.clock.now()), wake=True)


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
    cfg, queue = open_queue(ctx, config_path)
    with guarded(), sel.operator_log(cfg):
        target = resolve(queue)
        go = not target.empty
        if ask and go:
            if everything:
                count = queue.stats().total
            else:
                chosen = set(target.selector.ids)
                if checked:
                    chosen |= {v.id for v in queue.list(domain=checked)}
                count = len(chosen)
            what = "the whole queue" if everything else plural(count)
            go = count > 0  # nothing to ask about: nothing is deleted
            if go and not click.confirm(f"Delete {what} for good?", default=False, err=True):
                fail("nothing deleted")
        deleted = queue.delete(target.selector) if go else []
        maillog.operator("deleted", deleted, sel.operator_name())
        note = None if deleted else sel.nothing_for_domain(cfg, queue, domain, checked)
        click.echo(note or f"{plural(len(deleted))} deleted")
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
    user = sel.operator_name()
    with guarded(), sel.operator_log(cfg):
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
            maillog.operator("bounced", [qid], user)
            maillog.bounces_suppressed(message, decision.attempt.suppressed)
            dsns = decision.attempt.dsns
            queued_dsns += len(dsns)
            if dsns:
                click.echo(f"{qid}: returned to <{message.sender}> (DSN queued as {dsns[0].id})")
            elif held := decision.attempt.suppressed:
                click.echo(f"{qid}: removed; bounce suppressed: spf={held[0]}")
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


VERBS = (flush_command, hold_command, release_command, requeue_command, delete_command,
         bounce_command)
