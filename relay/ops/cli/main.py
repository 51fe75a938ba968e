"""The `relay` command: serve, check-config, db, queue.

Owns argument parsing, config lookup (`-c` before or after the command
words, then $RELAY_CONFIG, then config/relay.toml, then defaults), exit codes
(0 ok, 1 operational error, 2 usage) and turning every expected failure into
one stderr line instead of a traceback. Refuses queue logic: operator verbs
call `queue.py`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from relay.core import config as configuration
from relay.core import maillog
from relay.ops.cli.common import config_option, fail, load_config
from relay.queue import db
from relay.queue.access import QueueError

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
    maillog.setup(log_level or cfg.log.level, json_lines=cfg.log.format == "json")
    from relay import service

    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    _settle_garbage_collector()
    try:
        runner(service.serve(cfg))
    except (db.DatabaseError, QueueError) as exc:
        fail(f"{exc} (queue: {cfg.queue.location})")
    except OSError as exc:
        fail(f"cannot start: {exc.strerror or exc}")


@main_group.command("check-config")
@config_option
@click.pass_context
def check_config(ctx: click.Context, config_path: str | None) -> None:
    """Validate the config and print the effective settings (paths resolved)."""
    cfg = load_config(ctx, config_path)
    click.echo(f"# {cfg.source}: ok")
    click.echo(json.dumps(configuration.effective(cfg), indent=2))


@main_group.group("db")
def db_group() -> None:
    """Schema migrations of the queue database."""


@db_group.command("upgrade")
@config_option
@click.pass_context
def db_upgrade(ctx: click.Context, config_path: str | None) -> None:
    """Migrate the queue database to the newest schema."""
    cfg = load_config(ctx, config_path)
    try:
        rev = db.upgrade(db.connect(cfg.queue.url))
    except db.DatabaseError as exc:
        fail(f"{exc} (queue: {cfg.queue.location})")
    click.echo(f"database at revision {rev.current} (head)")
    click.echo(f"queue: {cfg.queue.location}")


@db_group.command("current")
@config_option
@click.pass_context
def db_current(ctx: click.Context, config_path: str | None) -> None:
    """Print the database's schema revision and whether it is current."""
    cfg = load_config(ctx, config_path)
    try:
        rev = db.revision(db.connect(cfg.queue.url))
    except db.DatabaseError as exc:
        fail(f"{exc} (queue: {cfg.queue.location})")
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


def main() -> None:
    """Console-script entry point."""
    try:
        from relay.ops.cli.queue import queue_group

        main_group.add_command(queue_group, "queue")
        main_group(prog_name="relay")
    except KeyboardInterrupt:
        sys.exit(130)
