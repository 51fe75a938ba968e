"""What the `relay queue` commands share: opening the queue, choosing messages, failing.

Owns the checks made before any database work (domain syntax, queue IDs
normalised to the stored upper case, `--all` against IDs), opening a queue
whose schema is at head, turning every expected failure into one stderr
line, saying so when a domain selects nothing, and the mail log a command
writes on stderr. Refuses output formats (`queue_views.py`) and the commands
themselves.

Imports the database layers inside the functions that need them, so that
`relay --help` and usage errors never pay for SQLAlchemy.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from relay.core.address import AddressError, parse_domain
from relay.core.clock import Clock, SystemClock
from relay.ops.cli.common import fail, load_config

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from relay.core.config import Config
    from relay.queue.access import Queue
    from relay.queue.rows import Selector

_ULID = re.compile(r"[0-9A-Za-z]{26}")

clock: Clock = SystemClock()  # the one source of "now"; tests may replace it


def valid_domain(name: str) -> str | None:
    """The domain as the queue stores it (A-label form, lower case, no final
    dot), or None if malformed. Either spelling of an internationalised domain
    is accepted; address literals (`[192.0.2.1]`, `[IPv6:...]`) are kept as given.
    """
    try:
        return parse_domain(name).key
    except AddressError:
        return None


def queue_id(text: str) -> str:
    """Queue IDs are ULIDs, stored in upper case: `01j9...` names `01J9...`."""
    text = text.strip()
    return text.upper() if _ULID.fullmatch(text) else text


def queue_ids_argument(
    ctx: click.Context, param: click.Parameter, value: str | Sequence[str] | None
) -> str | tuple[str, ...] | None:
    """Click callback: normalise one ID or many, as typed on the command line."""
    if value is None or isinstance(value, str):
        return None if value is None else queue_id(value)
    return tuple(queue_id(v) for v in value)


def usage(ctx: click.Context, message: str) -> NoReturn:
    """A usage error: click prints usage and the message, exit 2."""
    raise click.UsageError(message, ctx)


def one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


@contextmanager
def guarded() -> Iterator[None]:
    """Every expected failure becomes one `relay: ...` line and exit 1; never a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from relay.queue.db import DatabaseError
    from relay.queue.rows import QueueError

    try:
        yield
    except BrokenPipeError:  # `relay queue list | head`
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # pragma: no cover - odd stdout
            pass
        sys.exit(1)
    except DatabaseError as exc:  # names its database already (relay.queue.db)
        fail(str(exc))
    except QueueError as exc:
        fail(f"queue error: {exc}{_where()}")
    except SQLAlchemyError as exc:
        fail(f"database error: {one_line(exc)}{_where()}")
    except OSError as exc:
        fail(f"{exc.strerror or exc}")
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except Exception as exc:  # the contract: one line, never a traceback
        fail(f"unexpected error: {type(exc).__name__}: {one_line(exc)}")


def _where() -> str:
    """` (queue: LOCATION)` once the command knows its queue: every database
    error names which database it is about."""
    ctx = click.get_current_context(silent=True)
    location = ctx.meta.get(QUEUE_LOCATION) if ctx is not None else None
    return f" (queue: {location})" if location else ""


QUEUE_LOCATION = "relay.queue_location"  # click context meta key


def open_queue(ctx: click.Context, config_path: str | None) -> tuple[Config, Queue]:
    """Config, then a Queue on a database at head revision, or one line and exit 1."""
    cfg = load_config(ctx, config_path)
    ctx.meta[QUEUE_LOCATION] = cfg.queue.location
    with guarded():
        from relay.queue import db
        from relay.queue.access import Queue

        engine = db.connect(cfg.queue.url)
        ctx.call_on_close(engine.dispose)
        _check_schema(engine)
    return cfg, Queue(engine)


def _check_schema(engine: Engine) -> None:
    from relay.queue import db

    url = engine.url
    # Never create an empty SQLite file from a command that only reads or edits rows.
    database = url.database if url.get_backend_name() == "sqlite" else None
    if database and database != ":memory:" and not Path(database).exists():
        fail(f"database not initialised: run relay db upgrade{_where()}")
    head = shipped_head()
    if head is not None and stored_revision(engine) == head:
        return  # the usual case, without loading Alembic (a fifth of a command's time)
    rev = db.revision(engine)
    if rev.current is None:
        fail(f"database not initialised: run relay db upgrade{_where()}")
    if rev.current != rev.head:
        fail(
            f"database schema is at revision {rev.current}, this relay needs {rev.head}: "
            "run relay db upgrade"
        )


_REVISION_LINE = re.compile(
    r"^(down_revision|revision)\s*(?::[^=]*)?=\s*(?:None|[\"']([\w-]+)[\"'])", re.M)


def shipped_head() -> str | None:
    """The newest migration we ship, read from the scripts' `revision` lines; None
    when that reading is not plain (several heads, an odd file): ask Alembic then."""
    import relay.migrations

    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (Path(relay.migrations.__file__).parent / "versions").glob("*.py"):
        found = dict(_REVISION_LINE.findall(script.read_text("utf-8")))
        if found.get("revision"):
            revisions.add(found["revision"])
            if found.get("down_revision"):
                parents.add(found["down_revision"])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def stored_revision(engine: Engine) -> str | None:
    """The revision Alembic recorded in the database, or None if it cannot be read."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    except SQLAlchemyError:
        return None
    return str(rows[0][0]) if len(rows) == 1 else None


def domain_option(domain: str | None) -> str:
    if domain is None:
        return ""
    try:
        return parse_domain(domain).key
    except AddressError as exc:
        _, _, why = str(exc).partition("is not a domain name: ")
        fail(f"bad domain {domain!r}: not a domain name" + (f" ({why})" if why else ""))


def report_unknown(unknown: Sequence[str]) -> None:
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


def target(
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
    checked = domain_option(domain)
    wanted = tuple(dict.fromkeys(i.strip() for i in ids if i.strip()))
    if ids and not wanted:
        usage(ctx, "empty queue ID")

    def resolve(queue: Queue) -> Target:
        from relay.queue.rows import Selector

        found = queue.existing(wanted) if wanted else set()
        known = tuple(i for i in wanted if i in found)
        unknown = tuple(i for i in wanted if i not in found)
        return Target(Selector(ids=known, domain=checked, everything=everything), unknown)

    return resolve, checked


def finish(unknown: Sequence[str]) -> None:
    report_unknown(unknown)
    if unknown:
        sys.exit(1)


def operator_log(cfg: Config) -> AbstractContextManager[None]:
    """The mail log on stderr, in the config's format and level, while a verb runs."""
    from relay.core import maillog

    return maillog.to_stderr(cfg.log.level, json_lines=cfg.log.format == "json")


def operator_name() -> str:
    """Who ran the command, for the mail log (the login name, else the uid)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # no passwd entry (a container's bare uid)
        return str(os.getuid())


def nothing_for_domain(cfg: Config, queue: Queue, domain: str | None, checked: str) -> str | None:
    """`no queued message for domain D`, plus `(D is not a hosted domain)` when
    it is not in the config, when `--domain D` selects no message at all;
    None when it does (or no domain was given)."""
    if not checked or queue.counts_by_destination().get(checked):
        return None
    shown = (domain or checked).strip()
    note = f"no queued message for domain {shown}"
    if cfg.domain(checked) is None:
        note += f" ({shown} is not a hosted domain)"
    return note


def wake_relays(queue: Queue, changed: int) -> None:
    """Mail became due now: running relays start on it at once, not at their next poll."""
    if changed:
        from relay.cluster.notify import notify

        notify(queue.engine)
