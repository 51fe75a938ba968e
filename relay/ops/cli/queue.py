"""`relay queue ...`: the operator's view of the queue and the verbs that change it.

Owns the `queue` command group of SPEC "Package and commands" and its read
commands: `list` (mailq-like table or JSON), `show` (human, JSON or the raw
stored bytes) and `stats`. The verbs that change the queue (`flush`, `hold`,
`release`, `requeue`, `delete`, `bounce`) are in `queue_verbs.py`; choosing messages,
opening the queue and one-line failures in `queue_select.py`; output formats
in `queue_views.py`. Every command checks that the database is at head
revision before touching it; exit codes are 0 ok, 1 operational, 2 usage.

Refuses to run the scheduler, to migrate the database and to write SQL.
"""

from __future__ import annotations

import sys

import click

from relay.core.model import MessageState
from relay.ops.cli import queue_select as sel
from relay.ops.cli.common import config_option, fail
from relay.ops.cli.queue_select import (
    domain_option,
    guarded,
    open_queue,
    queue_ids_argument,
    usage,
    valid_domain,
)
from relay.ops.cli.queue_verbs import VERBS
from relay.ops.cli.queue_views import (
    echo_json,
    history_text,
    human_time,
    iso,
    mailq,
    message_json,
    show_text,
    span,
)

__all__ = ["queue_group", "valid_domain"]

STATES = tuple(s.value for s in MessageState)


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
    checked = domain_option(domain)
    cfg, queue = open_queue(ctx, config_path)
    with guarded():
        views = queue.list(domain=checked, state=state or "")
        note = None if views else sel.nothing_for_domain(cfg, queue, domain, checked)
        if as_json:
            echo_json([message_json(v) for v in views])
            if note:
                click.echo(note, err=True)  # stdout stays JSON
        else:
            click.echo(note or mailq(views, sel.clock.now()))


@queue_group.command("show")
@config_option
@click.argument("queue_id", metavar="ID", callback=queue_ids_argument)
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
                click.echo(history_text(history))
            fail(f"unknown queue ID {queue_id}")
        if as_json:
            obj = message_json(view)
            # `queue list` keeps SPEC's four recipient keys; `show` says more.
            for item, rcpt in zip(obj["recipients"], view.recipients, strict=True):
                item["uncertain"] = rcpt.uncertain
                item["notify"] = list(rcpt.notify) if rcpt.notify is not None else None
                item["orcpt"] = rcpt.orcpt  # RFC 3461, as given; null when not
            obj["destination"] = view.destination
            obj["client_address"] = view.client_address
            obj["spf"] = view.spf
            obj["history"] = [
                {"at": iso(at), "recipient": rcpt, "outcome": outcome, "reply": reply,
                 "remote_host": remote}
                for at, rcpt, outcome, reply, remote in history
            ]
            echo_json(obj)
        else:
            click.echo(show_text(view, history, sel.clock.now()))


@queue_group.command("stats")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
@click.pass_context
def stats_command(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Counts by state and by destination domain, and the oldest message's age."""
    _, queue = open_queue(ctx, config_path)
    with guarded():
        stats = queue.stats()
        now = sel.clock.now()
        by_state = {state: stats.by_state.get(state, 0) for state in STATES}
        by_state.update({k: v for k, v in stats.by_state.items() if k not in by_state})
        by_domain = dict(sorted(stats.by_domain.items(), key=lambda kv: (-kv[1], kv[0])))
        oldest = (
            max(0, int((now - stats.oldest_received_at).total_seconds()))
            if stats.oldest_received_at is not None
            else 0
        )
        if as_json:
            echo_json({
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


for _verb in VERBS:
    queue_group.add_command(_verb)
