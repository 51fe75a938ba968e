"""What the demo prints: a timeline a newcomer can follow, then a summary.

Owns the wording and layout (rich, imported here only, so `relay --help`
never loads it): one line per event with the seconds since the start, who
acted and what happened, and after the events that move mail, who holds how
many messages. Refuses to observe anything itself: the scenario tells it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from rich.console import Console
from rich.table import Table

STYLES = {
    "demo": "bold",
    "dns": "cyan",
    "sender": "blue",
    "primary": "green",
    "Hektor": "magenta",
    "Norwich": "yellow",
}


class Timeline:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 console: Console | None = None) -> None:
        self._clock = clock
        self._start = clock()
        self.console = console or Console(highlight=False, soft_wrap=True)

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def event(self, who: str, what: str, holds: Mapping[str, int] | None = None) -> None:
        """One line: time, who, what; `holds` adds who holds how many messages now."""
        style = STYLES.get(who, "")
        line = f"[dim]{self.elapsed:5.1f}s[/] [{style}]{who:<8}[/] {what}"
        if holds:
            counts = "  ".join(f"{name} {n}" for name, n in holds.items())
            line += f"   [dim]holds: {counts}[/]"
        self.console.print(line)

    def heading(self, text: str) -> None:
        self.console.print(f"\n[bold]{text}[/]")

    def summary(self, rows: list[tuple[str, int, int, int]]) -> None:
        """Per relay: messages taken from the sender, delivered to the primary, held now."""
        table = Table(title="where the messages went", title_justify="left")
        table.add_column("relay")
        for column in ("from the sender", "to the primary", "left in its queue"):
            table.add_column(column, justify="right")
        for name, taken, delivered, held in rows:
            table.add_row(name, str(taken), str(delivered), str(held))
        self.console.print()
        self.console.print(table)
