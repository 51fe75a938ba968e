"""The `relay` command: serve, check-config, status, db, queue, recipients, nodes.

Owns argument parsing, config lookup (`-c` before or after the command
words, then $RELAY_CONFIG, then config/relay.toml, then defaults), exit codes
(0 ok, 1 operational error, 2 usage) and turning every expected failure into
one stderr line instead of a traceback. Refuses queue logic: operator verbs
call `queue.py`, `status` reads through `relay.ops.status`. Each command
imports what it needs when it runs (the service, SQLAlchemy, Alembic), so
`relay --help` and the queue commands start fast: operators script them.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

import click

from relay.ops.cli.common import NO_FILE, config_option, fail, load_config

GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (default 700)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.version_option(package_name="mx-relay", prog_name="relay")
@click.pass_context
def main_group(ctx: click.Context, config_path: str | None) -> None:
    """mx-relay: a store-and-forward SMTP backup MX relay."""
    ctx.obj = {"config_path": config_path}


def _settle_garbage_collector() -> None:
    """What startup built (config, schema, modules) lives as long as the process:
    out of the collector's sight. Every SMTP session allocates a few hundred
    containers that reference counting frees; a collection every 700 of them
    (the default) cost 3 % of the event loop's time while accepting."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


@main_group.command()
@config_option
@click.option(
    "--log-level",
    default=None,
    help="override [log] level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.pass_context
def serve(ctx: click.Context, config_path: str | None, log_level: str | None) -> None:
    """Run the SMTP listener, the delivery scheduler and metrics until SIGTERM."""
    cfg = load_config(ctx, config_path)
    if not cfg.domains:  # a backup MX for nobody: every RCPT would be refused
        fail(f'no domain is hosted: add a [domains."example.com"] table to {cfg.source}'
             if cfg.source != NO_FILE else
             'no domain is hosted: give a config file with a [domains."example.com"] table')
    import asyncio

    from relay import service
    from relay.core import maillog
    from relay.queue import db
    from relay.queue.rows import QueueError

    maillog.setup(log_level or cfg.log.level, json_lines=cfg.log.format == "json")

    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    _settle_garbage_collector()
    try:
        runner(service.serve(cfg, config_path=cfg.source if cfg.source != "<defaults>" else None,
                             log_level=log_level))
    except (db.DatabaseError, QueueError) as exc:
        fail(f"{exc} (queue: {cfg.queue.location})")
    except OSError as exc:
        fail(f"cannot start: {exc.strerror or exc}")


@main_group.command("check-config")
@config_option
@click.pass_context
def check_config(ctx: click.Context, config_path: str | None) -> None:
    """Validate the config and print the effective settings (paths resolved)."""
    import json

    from relay.core import config as configuration
    from relay.queue import db

    cfg = load_config(ctx, config_path)
    if problem := db.open_problem(cfg.queue.url):  # what serve would stop at, found now
        click.echo(f"{cfg.source}: queue.url: cannot open {db.location(cfg.queue.url)}: "
                   f"{problem}", err=True)
        sys.exit(1)
    click.echo(f"# {cfg.source}: ok")
    click.echo(json.dumps(configuration.effective(cfg), indent=2))


@main_group.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_context
def status_command(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """The queue, the destinations that are down or have mail, the nodes, at a glance."""
    from datetime import timedelta

    from relay.ops import status
    from relay.ops.cli import queue_select as sel
    from relay.ops.cli.queue_views import echo_json

    cfg, queue = sel.open_queue(ctx, config_path)
    with sel.guarded():
        url = queue.engine.url.render_as_string(hide_password=True)
        now = sel.clock.now()
        seen = queue.nodes(now - timedelta(seconds=cfg.queue.log_retention))
        found = status.gather(queue, url, sel.stored_revision(queue.engine), now, seen)
        if as_json:
            echo_json(status.as_json(found))
        else:
            click.echo(status.as_text(found))


@main_group.group("db")
def db_group() -> None:
    """Schema migrations of the queue database."""


@db_group.command("upgrade")
@config_option
@click.pass_context
def db_upgrade(ctx: click.Context, config_path: str | None) -> None:
    """Migrate the queue database to the newest schema."""
    from relay.queue import db

    cfg = load_config(ctx, config_path)
    try:
        rev = db.upgrade(db.connect(cfg.queue.url))
    except db.DatabaseError as exc:  # names its database already
        fail(str(exc))
    click.echo(f"database at revision {rev.current} (head)")
    click.echo(f"queue: {cfg.queue.location}")


@db_group.command("current")
@config_option
@click.pass_context
def db_current(ctx: click.Context, config_path: str | None) -> None:
    """Print the database's schema revision and whether it is current."""
    from relay.queue import db

    cfg = load_config(ctx, config_path)
    try:
        rev = db.revision(db.connect(cfg.queue.url))
    except db.DatabaseError as exc:  # names its database already
        fail(str(exc))
    known = True
    if rev.up_to_date:
        click.echo(f"{rev.current} (head)")
    elif rev.current is None:
        click.echo(f"empty (head is {rev.head}): run relay db upgrade")
    elif not db.is_known(rev.current):
        click.echo(f"{rev.current} (unknown to this relay; its head is {rev.head})")
        known = False
    else:
        click.echo(f"{rev.current} (head is {rev.head}): run relay db upgrade")
    click.echo(f"queue: {cfg.queue.location}")
    if not known:
        sys.exit(1)


@main_group.command()
@click.option("--messages", default=20, show_default=True, type=click.IntRange(2, 500),
              help="how many messages the sender sends")
def demo(messages: int) -> None:
    """Run the reference deployment on loopback: the primary MX down, two relays, nothing lost."""
    from relay.ops.demo import run

    sys.exit(run(messages))


def command_tree() -> click.Group:
    """Every `relay` command; the heavier groups are imported only here, when a
    command runs (and by the man page generator, which documents this tree)."""
    from relay.ops.cli.nodes import nodes_command
    from relay.ops.cli.queue import queue_group
    from relay.ops.cli.recipients import recipients_group

    main_group.add_command(queue_group, "queue")
    main_group.add_command(recipients_group, "recipients")
    main_group.add_command(nodes_command, "nodes")
    return main_group


def main() -> None:
    """Console-script entry point."""
    try:
        command_tree()(prog_name="relay")
    except KeyboardInterrupt:
        sys.exit(130)
