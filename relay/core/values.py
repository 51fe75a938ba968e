"""Config values as operators write them: durations, sizes, host:port, next hops.

Owns parsing one value into its typed form with a message that names what is
wrong. Refuses files and sections: `config.py` applies these to keys.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$", re.IGNORECASE)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_duration(value: object) -> float:
    """Seconds from `"30s"`, `"5m"`, `"4h"`, `"5d"` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration like "30s", "5m", "4h" or seconds')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match[1]) * _DURATION_UNITS[match[2].lower()]
    else:
        raise ValueError(f'{value!r} is not a duration like "30s", "5m", "4h", "5d"')
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from `"35MB"`, `"512KiB"` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError('expected a size like "35MB" or bytes')
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = match[2].lower()
        if unit not in _SIZE_UNITS:
            raise ValueError(f"{value!r}: unknown size unit {match[2]!r}")
        size = int(float(match[1]) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f'{value!r} is not a size like "35MB"')
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_host_name(text: str) -> bool:
    """A DNS host name: dot-separated labels of letters, digits and inner hyphens."""
    labels = text.removesuffix(".").split(".")
    return len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def parse_host_port(value: str, default_port: int | None = None) -> HostPort:
    """`"1.2.3.4:25"`, `"[::1]:25"`, `"host:25"` (or a bare host with a default port).

    A colon promises a port: `"host:"` is refused, never read as the default.
    """
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected ':port' after ']'")
        has_port, port_text = rest.startswith(":"), rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        has_port = True
    else:
        host, port_text, has_port = text, "", False
    if not host:
        raise ValueError(f"{value!r}: missing host")
    if not has_port:
        if default_port is None:
            raise ValueError(f"{value!r}: missing port (write host:port)")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    return HostPort(host, int(port_text))


def parse_next_hop(value: str) -> HostPort:
    """A host name or IP address with an optional port (default 25) we can connect to."""
    hp = parse_host_port(value, default_port=25)
    if not 1 <= hp.port <= 65535:
        raise ValueError(f"{value!r}: port must be from 1 to 65535")
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        if value.strip().startswith("[") or not is_host_name(hp.host):
            raise ValueError(f"{value!r}: {hp.host!r} is not a host name or IP address") from None
    return hp


def listen_address(value: object) -> HostPort:
    if not isinstance(value, str):
        raise ValueError('expected "ip:port"')
    hp = parse_host_port(value)
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        raise ValueError(f"{value!r}: listen on an IP address (ip:port), not a host name") from None
    return hp
