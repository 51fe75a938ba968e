"""SIGHUP: re-read the config and hand the running parts what may change.

Owns what a reload may change and what it may not. The keys bound when the
process started (`RESTART_KEYS`: the listening sockets, the queue, the node's
identity) keep their running values, and one log line names those that
changed in the file. A config that does not validate, or whose TLS files do
not load, is refused with its `file: key: problem` lines in the log; the
config in force stays and the relay goes on. One more line per reload says
what happened. Reloads run one at a time; one asked for while the relay is
still starting runs once it is ready.

Refuses to read the file itself (`relay.core.config.load`) and to know how a
part takes its new settings: `prepare` (the wiring in `service.py`) builds
everything that can fail, and returns the step that swaps it in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from relay.core.config import Config, ConfigError

log = logging.getLogger("relay.service")

# Bound at start: the sockets, the queue's engine, the name we greet and route
# by. A reload keeps their running values.
RESTART_KEYS = ("smtp.listen", "queue.url", "queue.lock_timeout", "metrics.listen",
                "node.hostname", "node.addresses")
SECTIONS = ("smtp", "queue", "delivery", "dns", "log", "domains")  # what a reload can change

Load = Callable[[], Config]
Prepare = Callable[[Config], Callable[[], None]]


def _value(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def needs_restart(old: Config, new: Config) -> list[str]:
    """The RESTART_KEYS whose value differs between `old` and `new`."""
    return [key for key in RESTART_KEYS if _value(old, key) != _value(new, key)]


def keep_running_values(old: Config, new: Config) -> Config:
    """`new` with every RESTART_KEYS value of `old`: what a reload puts in force."""
    return new.model_copy(update={
        "node": old.node,
        "smtp": new.smtp.model_copy(update={"listen": old.smtp.listen}),
        "queue": new.queue.model_copy(update={"url": old.queue.url,
                                              "lock_timeout": old.queue.lock_timeout}),
        "metrics": old.metrics,
    })


def changed_sections(old: Config, new: Config) -> list[str]:
    return [name for name in SECTIONS if getattr(old, name) != getattr(new, name)]


class Reloader:
    """The config in force, and the one way to replace it while running."""

    def __init__(self, config: Config, load: Load | None) -> None:
        self.config = config
        self._load = load  # None: started on built-in defaults, no file to re-read
        self._prepare: Prepare | None = None
        self._pending = False
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()

    def attach(self, prepare: Prepare) -> None:
        """The relay is up: reloads may apply now (one asked for meanwhile runs)."""
        self._prepare = prepare
        if self._pending:
            self._pending = False
            self.request()

    def request(self) -> None:
        """SIGHUP's handler: reload in a task of its own (the loop goes on)."""
        if self._prepare is None:
            self._pending = True
            log.info("SIGHUP while starting: the config is re-read once the relay is ready")
            return
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settled(self) -> None:
        """Wait for the reloads requested so far to end."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload(self) -> bool:
        """Re-read and apply the config; False when it was refused."""
        async with self._lock:
            try:
                return await self._reload()
            except Exception as exc:  # the relay keeps running whatever a reload meets
                log.error("reload failed: %s; the config in force stays", exc, exc_info=exc)
                return False

    async def _reload(self) -> bool:
        old = self.config
        if self._load is None:
            log.warning("reload: no config file was loaded at start (built-in defaults): "
                        "nothing to re-read")
            return False
        assert self._prepare is not None
        try:
            loaded = await asyncio.to_thread(self._load)
            restart = needs_restart(old, loaded)
            new = keep_running_values(old, loaded)
            commit = await asyncio.to_thread(self._prepare, new)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            log.error("reload of %s refused (%d problem%s): the config in force stays",
                      old.source, len(exc.problems), "" if len(exc.problems) == 1 else "s")
            return False
        commit()
        self.config = new
        if restart:
            log.warning("reload: %s: changed in %s, needs a restart; running on with the "
                        "values it started with", ", ".join(restart), new.source)
        changed = changed_sections(old, new)
        log.info("reloaded %s: %s", new.source,
                 f"changed {', '.join(changed)}" if changed else "no change in force")
        return True
