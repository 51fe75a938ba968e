"""The reference deployment of SPEC, for end-to-end tests (fixtures in tests/e2e/conftest.py).

verrotech.com has MX 10 mail.verrotech.com (the primary, a sink on 127.0.0.2),
MX 20 mail.verrotech.net (this relay, on 127.0.0.3) and MX 30
mail.noc.verrotech.com (Norwich, a sink on 127.0.0.4). Senders' domain
sender.example has its MX on 127.0.0.5. A real DNS server on 127.0.0.1
serves the zone; the relay's queue is real SQLite in the test's tmp_path.

Owns: the zone, the relay's config file (a base config merged with per-test
overrides, written as TOML), and small helpers every e2e test shares
(`message()`, `strip_received()`, one SMTP session through `send()`).
Refuses to start anything by itself: sinks and relays are started by tests.
"""

from __future__ import annotations

import copy
import json
import smtplib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.dns_server import DnsServer
from tests.support.relay_process import RelayProcess
from tests.support.smtp_sink import Sink

__all__ = [
    "NORWICH",
    "PRIMARY",
    "RELAY",
    "SENDER_MX",
    "Deployment",
    "add_zone",
    "base_config",
    "merge",
    "message",
    "strip_received",
    "to_toml",
]

PRIMARY, RELAY, NORWICH, SENDER_MX = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"

Overrides = Mapping[str, Any]


def add_zone(dns: DnsServer) -> None:
    """The reference zone: verrotech.com's three MX hosts and the sender's MX."""
    dns.add("verrotech.com", "MX", "10 mail.verrotech.com.", "20 mail.verrotech.net.",
            "30 mail.noc.verrotech.com.")
    dns.add("mail.verrotech.com", "A", PRIMARY)
    dns.add("mail.verrotech.net", "A", RELAY)
    dns.add("mail.noc.verrotech.com", "A", NORWICH)
    dns.add("sender.example", "MX", "10 mx.sender.example.")
    dns.add("mx.sender.example", "A", SENDER_MX)


def base_config(tmp_path: Path, relay_port: int, mx_port: int,
                nameserver: tuple[str, int]) -> dict[str, Any]:
    """Hektor's config (mail.verrotech.net) as TOML data, before overrides."""
    host, port = nameserver
    return {
        "node": {"hostname": "mail.verrotech.net"},
        "smtp": {"listen": [f"{RELAY}:{relay_port}"]},
        "queue": {"url": f"sqlite:///{tmp_path}/queue.db"},
        "delivery": {
            "port": mx_port,
            "min_backoff": "1s",
            "max_backoff": "2s",
            "connect_timeout": "2s",
        },
        "dns": {"nameservers": [f"{host}:{port}"], "timeout": "2s"},
        "metrics": {"listen": ""},
        "domains": {"verrotech.com": {}},
    }


def merge(base: Mapping[str, Any], overrides: Overrides) -> dict[str, Any]:
    """`base` with `overrides` applied: tables merge key by key, other values replace."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key):
        return key
    return json.dumps(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Enough TOML for a relay config: tables of scalars, lists and sub-tables."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars]
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, table in tables:
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        has_scalars = any(not isinstance(v, Mapping) for v in table.values())
        if has_scalars or not table:
            text += f"\n[{name}]\n"
        text += to_toml(table, name)
    return text


@dataclass
class Deployment:
    dns: DnsServer
    config: Path
    relay_port: int
    mx_port: int  # the port every MX host listens on (delivery.port)
    start_sink: Callable[..., Sink]
    relay_class: type[RelayProcess]
    base: dict[str, Any] = field(default_factory=dict)  # the config before overrides
    settings: dict[str, Any] = field(default_factory=dict)  # what `config` holds now

    def write_config(self, overrides: Overrides | None = None, /,
                     **sections: Mapping[str, Any]) -> Path:
        """Rewrite the config file: the base config merged with `overrides`.

        ``deployment.write_config(metrics={"listen": "127.0.0.1:9100"},
        log={"format": "json"})``; a relay started afterwards reads it.
        """
        self.settings = merge(merge(self.base, overrides or {}), sections)
        self.config.write_text(to_toml(self.settings))
        return self.config

    def relay(self) -> RelayProcess:
        return self.relay_class(self.config)

    def sink(self, host: str, **options: object) -> Sink:
        return self.start_sink(host, self.mx_port, **options)

    def send(self, sender: str, recipients: list[str], data: bytes) -> str:
        """One SMTP session to the relay; returns the queue ID from the 250 reply."""
        with smtplib.SMTP(RELAY, self.relay_port, timeout=10) as client:
            client.ehlo("client.sender.example")
            client.mail(sender)
            for rcpt in recipients:
                code, reply = client.rcpt(rcpt)
                assert code == 250, reply
            code, reply = client.data(data)
            assert code == 250, reply
        text = reply.decode()
        assert text.startswith("2.0.0 Ok: queued as "), text
        return text.rsplit(" ", 1)[1]


def message(n: int, to: str = "alice@verrotech.com") -> bytes:
    return (
        f"From: Sender <s@sender.example>\r\nTo: <{to}>\r\nSubject: message {n}\r\n"
        f"Message-ID: <m{n}@sender.example>\r\n\r\nHello {n}.\r\n.leading dot line\r\n"
    ).encode()


def strip_received(data: bytes) -> bytes:
    """Remove what we prepend: our Authentication-Results header (SPF on) and
    our Received header, each with its folded lines."""
    lines = data.split(b"\r\n")
    rest = 0
    for name in (b"Authentication-Results: ", b"Received: "):
        if name == b"Received: ":
            assert lines[rest].startswith(name), lines[rest]
        elif not lines[rest].startswith(name):
            continue
        rest += 1
        while lines[rest][:1] in (b" ", b"\t"):
            rest += 1
    return b"\r\n".join(lines[rest:])
