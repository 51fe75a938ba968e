"""`relay nodes`: every `relay serve` seen on this queue, for the operator.

Owns the command's output: a table, or with `--json` an array of
`{"id", "hostname", "pid", "started_at", "last_seen_at", "active_deliveries"}`
(SPEC "Several nodes, one queue"), the nodes seen within `queue.log_retention`,
oldest start first. Refuses to change anything: nodes register themselves
by their heartbeat (`relay.cluster.nodes`).
"""

from __future__ import annotations

from datetime import timedelta

import click

from relay.ops.cli import queue_select
from relay.ops.cli.common import config_option
from relay.ops.cli.queue_select import guarded, open_queue
from relay.ops.cli.queue_views import echo_json, iso
from relay.ops.status import node_json


@click.command("nodes")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@click.pass_context
def nodes_command(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Every relay serve seen on this queue in the last log_retention (`up` within one lease)."""
    cfg, queue = open_queue(ctx, config_path)
    now = queue_select.clock.now()
    with guarded():
        seen = queue.nodes(now - timedelta(seconds=cfg.queue.log_retention))
    if as_json:
        echo_json([node_json(n) for n in seen])
        return
    if not seen:
        click.echo("no node has run on this queue lately")
        return
    rows = [("ID", "HOSTNAME", "PID", "STATE", "STARTED", "LAST SEEN", "ACTIVE")]
    rows += [
        (n.id, n.hostname, str(n.pid), "up" if n.alive_until >= now else "gone",
         iso(n.started_at) or "", iso(n.last_seen_at) or "", str(n.active_deliveries))
        for n in seen
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
