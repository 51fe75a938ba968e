"""`relay demo`: the reference deployment of SPEC, runnable on loopback.

Owns running the demo in a temporary directory that is removed afterwards,
with nothing left running, and its verdict: the final `demo: ...` line and
exit status 0 only when every message reached the primary exactly once.
Refuses to need root, a config file or anything outside 127.0.0.0/8: the
parts live in `zone` (DNS), `primary`, `relays`, `sender`, `scenario` (the
story) and `timeline` (the output).
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path

from relay.ops.demo.relays import DemoError
from relay.ops.demo.scenario import Demo
from relay.ops.demo.timeline import Timeline

__all__ = ["run"]

INTERRUPTED = 130  # the exit status after Ctrl-C, as a shell reports SIGINT


def run(messages: int) -> int:
    """Run the demo with `messages` messages; print its timeline; the exit status."""
    timeline = Timeline()
    timeline.console.print(
        f"[bold]mx-relay demo[/]: {messages} messages for verrotech.com while its primary "
        "MX is down, through the two backup MX relays"
    )
    with tempfile.TemporaryDirectory(prefix="relay-demo-") as workdir:
        demo = Demo(messages, Path(workdir), timeline)
        failed = False
        interrupted = _watch_ctrl_c()
        try:
            result = asyncio.run(demo.run())
            if interrupted:  # a Ctrl-C that a finishing step swallowed still ends the demo
                raise KeyboardInterrupt
        except DemoError as exc:
            timeline.console.print(f"[red]demo: {exc}[/]")
            result, failed = demo.tally(), True
        except KeyboardInterrupt:  # the relays were stopped on the way out
            timeline.console.print("[red]demo: interrupted[/]")
            return INTERRUPTED
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            demo.close()
    print(result.line, flush=True)
    return 0 if result.ok and not failed else 1


def _watch_ctrl_c() -> list[bool]:
    """SIGINT raises KeyboardInterrupt at once, wherever the demo is, and is
    remembered: asyncio's own handler only cancels the main task, which a step
    that is just finishing can absorb, and then the demo would run to its end."""
    seen: list[bool] = []

    def on_sigint(signum: int, frame: object) -> None:
        seen.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    return seen
