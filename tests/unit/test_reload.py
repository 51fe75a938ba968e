"""What a reload may change (relay/reload.py): the keys bound at start keep
their running values, a refused or failing reload leaves the config in force,
and a SIGHUP during startup is applied once the relay is ready."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.core import config as configuration
from relay.core.config import Config, ConfigError
from relay.reload import Reloader, changed_sections, keep_running_values, needs_restart


def config(tmp_path: Path, **data: Any) -> Config:
    base = {"smtp": {"listen": ["127.0.0.1:25"]}, "queue": {"url": "sqlite:////q.db"},
            "domains": {"old.example": {}}}
    return configuration.from_mapping({**base, **data}, source="relay.toml", env={},
                                      base=tmp_path)


def test_keys_bound_at_start_keep_their_running_values(tmp_path: Path) -> None:
    old = config(tmp_path)
    new = config(tmp_path, smtp={"listen": ["127.0.0.1:26"], "max_recipients": 5},
                 queue={"url": "sqlite:////other.db", "log_retention": "1d",
                        "lock_timeout": "9s"},
                 node={"hostname": "other.example"}, metrics={"listen": "127.0.0.1:1"},
                 domains={"new.example": {}})
    assert needs_restart(old, new) == ["smtp.listen", "queue.url", "queue.lock_timeout",
                                       "metrics.listen", "node.hostname"]
    kept = keep_running_values(old, new)
    assert (kept.smtp.listen, kept.queue.url, kept.queue.lock_timeout, kept.node,
            kept.metrics) == (old.smtp.listen, old.queue.url, old.queue.lock_timeout, old.node,
                              old.metrics)
    assert (kept.smtp.max_recipients, kept.queue.log_retention) == (5, 86400.0)
    assert list(kept.domains) == ["new.example"]
    assert changed_sections(old, kept) == ["smtp", "queue", "domains"]
    assert needs_restart(old, kept) == [] and changed_sections(old, old) == []


class Parts:
    """Stands in for the running relay: records what a reload commits."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.applied: list[Config] = []

    def prepare(self, new: Config) -> Callable[[], None]:
        if self.fail is not None:
            raise self.fail
        return lambda: self.applied.append(new)


async def test_a_sighup_during_startup_is_applied_once_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    old, new = config(tmp_path), config(tmp_path, domains={"new.example": {}})
    reloader, parts = Reloader(old, lambda: new), Parts()
    reloader.request()
    assert "SIGHUP while starting: the config is re-read once the relay is ready" \
        in caplog.messages
    assert parts.applied == []
    reloader.attach(parts.prepare)
    await reloader.settled()
    assert len(parts.applied) == 1
    assert parts.applied[0].domains.keys() == {"new.example"}
    assert reloader.config is parts.applied[0]


async def test_refused_and_failed_reloads_leave_the_config_in_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    old = config(tmp_path)

    def bad() -> Config:
        raise ConfigError(["relay.toml: smtp.max_recipients: too few", "relay.toml: x: y"])

    refused = Reloader(old, bad)
    refused.attach(Parts().prepare)
    assert await refused.reload() is False
    assert refused.config is old
    assert caplog.messages[-3:] == [
        "reload refused: relay.toml: smtp.max_recipients: too few",
        "reload refused: relay.toml: x: y",
        "reload of relay.toml refused (2 problems): the config in force stays",
    ]
    broken = Reloader(old, lambda: old)
    broken.attach(Parts(fail=RuntimeError("boom")).prepare)
    assert await broken.reload() is False
    assert broken.config is old
    assert caplog.messages[-1] == "reload failed: boom; the config in force stays"
    defaults = Reloader(old, None)
    defaults.attach(Parts().prepare)
    assert await defaults.reload() is False
    assert "nothing to re-read" in caplog.messages[-1]
