"""`relay recipients ...`: what the relay knows about addresses, for the operator.

Owns the `recipients` command group of SPEC "Knowing recipients while the
primary is down": `list` (a table or JSON; expired knowledge is left out, by
each configured domain's TTLs), `forget ADDR ...` and `import FILE --domain
D` (known-valid; a file with one bad line is refused whole, `FILE:LINE:
problem`, exit 1, nothing imported). Refuses SQL: the queue's
`recipients.py` reads and writes, in one transaction per command.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from relay.core.address import AddressError, parse_address
from relay.core.recipients import KnownRecipient, KnownState, Ttl
from relay.ops.cli.common import config_option, fail
from relay.ops.cli.queue_select import domain_option, guarded, open_queue
from relay.ops.cli.queue_views import echo_json, iso

if TYPE_CHECKING:
    from relay.core.config import Config

# A dot-atom local part (RFC 5321), non-ASCII allowed; no routing characters.
_LOCAL_RE = re.compile(r"[A-Za-z0-9#$&'*+\-/=?^_`{|}~\x80-\U0010ffff]+"
                       r"(?:\.[A-Za-z0-9#$&'*+\-/=?^_`{|}~\x80-\U0010ffff]+)*")


class ImportRefused(Exception):
    """A line of an import file is not an address of its domain: `FILE:LINE: problem`."""


def parse_import(text: str, domain: str, name: str) -> list[str]:
    """The addresses of an import file for `domain` (its A-label key): one
    address or bare local part a line; blank lines and `#` comments skipped."""
    addresses = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{name}:{number}"
        if any(ch.isspace() for ch in line):
            raise ImportRefused(f"{where}: one address a line, found {line!r}")
        local, at, _ = line.rpartition("@")
        if not at:
            local = line
        elif not _of_domain(line, domain):
            raise ImportRefused(f"{where}: {line!r} is not an address of {domain}")
        if not _LOCAL_RE.fullmatch(local):
            raise ImportRefused(f"{where}: {local!r} is not a valid local part")
        addresses.append(f"{local}@{domain}" if not at else line)
    return addresses


def _of_domain(line: str, domain: str) -> bool:
    try:
        parsed = parse_address(line)
    except AddressError:
        return False
    return parsed.domain is not None and parsed.domain.key == domain


def _is_address(text: str) -> bool:
    try:
        return parse_address(text).domain is not None
    except AddressError:
        return False


def _ttl(config: Config, domain: str) -> Ttl | None:
    settings = config.domains.get(domain)
    return None if settings is None else Ttl(settings.verify_valid_ttl,
                                             settings.verify_invalid_ttl)


def _current(config: Config, rows: Sequence[KnownRecipient]) -> list[KnownRecipient]:
    """Rows not expired by their domain's TTLs (a domain no longer configured: all)."""
    now = datetime.now(UTC)
    kept = []
    for row in rows:
        ttl = _ttl(config, row.domain)
        if ttl is None or not ttl.expired(row.state, row.last_seen_at, now):
            kept.append(row)
    return kept


def _json(row: KnownRecipient) -> dict[str, Any]:
    return {"address": row.address, "state": row.state.value, "source": row.source.value,
            "learned_at": iso(row.learned_at), "last_seen_at": iso(row.last_seen_at)}


def _table(rows: Sequence[KnownRecipient]) -> str:
    if not rows:
        return "No known recipients."
    lines = [f"{'STATE':<8} {'SOURCE':<9} {'LAST SEEN':<20} ADDRESS"]
    lines += [f"{r.state.value:<8} {r.source.value:<9} {iso(r.last_seen_at):<20} {r.address}"
              for r in rows]
    return "\n".join(lines)


@click.group("recipients")
@config_option
@click.pass_context
def recipients_group(ctx: click.Context, config_path: str | None) -> None:
    """Addresses the next hop accepted or refused (learned, callout): list, forget, import."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    if config_path:
        root.obj["config_path"] = config_path


@recipients_group.command("list")
@config_option
@click.option("--domain", "domain", metavar="D", help="only addresses of this domain")
@click.option("--state", "state", type=click.Choice([s.value for s in KnownState]),
              help="only known-valid or only known-invalid addresses")
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@click.pass_context
def list_command(ctx: click.Context, config_path: str | None, domain: str | None,
                 state: str | None, as_json: bool) -> None:
    """Known addresses, by domain: state, where it was learned, when last seen."""
    key = domain_option(domain)
    config, queue = open_queue(ctx, config_path)
    with guarded():
        rows = _current(config, queue.known_recipients(domain=key, state=state or ""))
        if as_json:
            echo_json([_json(r) for r in rows])
        else:
            click.echo(_table(rows))


@recipients_group.command("forget")
@config_option
@click.argument("addresses", nargs=-1, required=True, metavar="ADDR...")
@click.pass_context
def forget_command(ctx: click.Context, config_path: str | None,
                   addresses: tuple[str, ...]) -> None:
    """Forget addresses (either state): the next delivery or import teaches them again."""
    for address in addresses:
        if not _is_address(address):
            fail(f"bad address {address!r}: expected local@domain")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        forgotten = queue.forget_recipients(addresses)
    click.echo(f"forgot {len(forgotten)} of {len(set(addresses))} addresses")
    for key in forgotten:
        click.echo(f"  {key}")


@recipients_group.command("import")
@config_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--domain", "domain", metavar="D", required=True,
              help="the domain every line belongs to")
@click.pass_context
def import_command(ctx: click.Context, config_path: str | None, file: Path,
                   domain: str) -> None:
    """Make the addresses in FILE known-valid: one address or local part a line."""
    key = domain_option(domain)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        fail(f"{file}: not UTF-8 text")
    try:
        addresses = parse_import(text, key, str(file))
    except ImportRefused as exc:
        click.echo(str(exc), err=True)
        fail(f"{file}: nothing imported")
    _, queue = open_queue(ctx, config_path)
    with guarded():
        count = queue.import_recipients(addresses, datetime.now(UTC))
    click.echo(f"imported {count} addresses of {key} as known-valid")
