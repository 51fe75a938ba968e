"""The hand-written pages of docs/ name everything the code has.

Not a proofreading: a command, option, metric, rejection reason or SMTP reply
code added to the code without a line in docs/ fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from relay.ops import metrics
from relay.ops.cli.main import command_tree
from relay.smtp import replies

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def _commands() -> list[tuple[str, click.Command]]:
    root = command_tree()
    found = []

    def walk(prefix: str, group: click.Group) -> None:
        for name, command in group.commands.items():
            found.append((f"{prefix} {name}", command))
            if isinstance(command, click.Group):
                walk(f"{prefix} {name}", command)

    walk("relay", root)
    return found


def test_cli_reference_names_every_command_and_option() -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for path, command in _commands():
        assert path in text, path
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    assert opt in text, f"{path} {opt}"


def test_metrics_reference_names_every_metric_and_reason() -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    for name, (kind, labels) in metrics.METRICS.items():
        assert f"`{name}`" in text, name
        assert kind in text
        for label in labels:
            assert f"`{label}`" in text
    assert f"`{metrics.NODE_LABEL}`" in text
    for name in metrics.PER_PROCESS:  # each named where the `node` label is described
        assert f"`{name}`" in text.split("### The `node` label", 1)[1], name
    reasons = {*replies.DATA_PROBLEMS.values(), *replies.POLICY_REASONS.values()}
    source = "\n".join(p.read_text() for p in (REPO / "relay" / "smtp").glob("*.py"))
    reasons |= set(re.findall(r'(?:_refuse|reject)\("([a-z_]+)"', source))
    for reason in reasons:
        assert f"`{reason}`" in text, reason


def test_smtp_reply_reference_has_every_code_the_relay_sends() -> None:
    text = (DOCS / "smtp-replies.md").read_text(encoding="utf-8")
    source = "\n".join(p.read_text() for p in (REPO / "relay" / "smtp").glob("*.py"))
    pairs = set(re.findall(r'"([245]\d\d [245]\.\d{1,3}\.\d{1,3})\b', source))
    pairs |= {f"{code} {enh}" for code, enh in
              re.findall(r'Reply\((\d{3}), f?"([245]\.\d{1,3}\.\d{1,3})', source)}
    assert len(pairs) > 20  # the scan found the replies
    for pair in sorted(pairs):
        assert pair in text, pair
