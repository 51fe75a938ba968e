"""End-to-end fixtures: the reference deployment (tests/support/deployment.py).

`deployment` writes Hektor's config merged with `deployment_config`, a
mapping of TOML sections a test module (or a test, through indirect
parametrisation) overrides::

    @pytest.fixture
    def deployment_config() -> dict[str, object]:
        return {"log": {"format": "json"}, "delivery": {"max_lifetime": "2s"}}

A test can also rewrite the config before starting a relay with
``deployment.write_config(smtp={"etrn_clients": ["127.0.0.0/8"]})``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support.deployment import (
    NORWICH,
    PRIMARY,
    RELAY,
    SENDER_MX,
    Deployment,
    add_zone,
    base_config,
)
from tests.support.dns_server import DnsServer
from tests.support.relay_process import RelayProcess, free_port
from tests.support.smtp_sink import Sink


@pytest.fixture
def deployment_config(request: pytest.FixtureRequest) -> Mapping[str, Any]:
    """Config overrides (TOML sections) for `deployment`; none by default."""
    return getattr(request, "param", {})


@pytest.fixture
def deployment(tmp_path: Path, dns_server: DnsServer, smtp_sink: Callable[..., Sink],
               relay_process: type[RelayProcess],
               deployment_config: Mapping[str, Any]) -> Iterator[Deployment]:
    mx_port = free_port(PRIMARY, NORWICH, SENDER_MX)
    relay_port = free_port(RELAY)
    add_zone(dns_server)
    config = tmp_path / "hektor.toml"
    base = base_config(tmp_path, relay_port, mx_port, dns_server.address)
    deployed = Deployment(dns_server, config, relay_port, mx_port, smtp_sink, relay_process,
                          base=base)
    deployed.write_config(deployment_config)
    yield deployed
