"""What every `relay` command shares: `-c/--config`, config lookup, the one-line failure.

Owns turning a config problem or an operational error into stderr lines and
exit 1, and saying so on stderr when no config file was found. Refuses
everything else; the command groups import it, never each other.
Imports nothing heavy at module level: `relay --help` must start fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from relay.core.config import Config

F = TypeVar("F", bound=Callable[..., Any])

NO_FILE = "<defaults>"  # `Config.source` when no config file was found

def fail(message: str) -> NoReturn:
    """One clear line on stderr, exit 1."""
    click.echo(f"relay: {message}", err=True)
    sys.exit(1)


def config_option(func: F) -> F:
    """`-c/--config`, accepted on the group and on every command."""
    return click.option(
        "-c",
        "--config",
        "config_path",
        metavar="PATH",
        default=None,
        help="config file (default: $RELAY_CONFIG, else config/relay.toml, else built-ins)",
    )(func)


def load_config(ctx: click.Context, path: str | None) -> Config:
    """The config named after the command words wins over one named before them."""
    from relay.core import config as configuration  # pydantic: only once a command runs

    chosen = path or (ctx.find_root().obj or {}).get("config_path")
    try:
        cfg = configuration.load(chosen)
    except configuration.ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(1)
    if cfg.source == NO_FILE:  # silent defaults would bind 0.0.0.0:25 hosting nothing
        click.echo("relay: no config file (tried -c, $RELAY_CONFIG, config/relay.toml); "
                   "using built-in defaults", err=True)
    return cfg
