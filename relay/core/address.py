"""The one address type: a domain in A-label form, an address as local part plus domain.

Owns turning the text of a domain or an address, wherever it enters (SMTP
paths, ETRN, config keys, CLI selectors), into the one form every stage
compares and stores: the domain's A-label form (IDNA 2008 with UTS #46
mapping, the `idna` package, never Python's IDNA 2003 codec), lower case,
without a final dot; the U-label form is kept for display. Address literals
(`[192.0.2.1]`, `[IPv6:2001:db8::1]`) are kept exactly as given. The local
part is kept exactly as given: only its owner may interpret it.

Refuses policy (which domains are hosted, which local parts are routing
tricks: `relay.smtp.policy`) and I/O. Every malformed input raises
`AddressError` naming the problem, never anything else.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

__all__ = [
    "NULL_SENDER",
    "Address",
    "AddressError",
    "Domain",
    "destination_key",
    "host_key",
    "parse_address",
    "parse_domain",
]

_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[!-Z^-~]+")  # RFC 5321 4.1.3
MAX_DOMAIN = 253  # octets of a name without its final dot (RFC 1035 2.3.4)


class AddressError(ValueError):
    """A domain or address that cannot be parsed; the message names the problem."""


@dataclass(frozen=True, slots=True)
class Domain:
    """A mail domain. Equal domains have equal `key`s, whatever their spelling."""

    key: str  # A-label form, lower case, no final dot; a literal as given
    display: str  # U-label form for people; the literal again for a literal

    @property
    def is_literal(self) -> bool:
        return self.key.startswith("[")

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True, slots=True)
class Address:
    """An envelope address: the local part as given and its domain; `domain`
    None is the null sender `<>`."""

    local: str
    domain: Domain | None

    @property
    def is_null(self) -> bool:
        return self.domain is None

    @property
    def key(self) -> str:
        """`local@a-label`: the form to compare and store."""
        return "" if self.domain is None else f"{self.local}@{self.domain.key}"

    @property
    def display(self) -> str:
        """`local@u-label`: the form to show."""
        return "" if self.domain is None else f"{self.local}@{self.domain.display}"

    def __str__(self) -> str:
        return self.key


NULL_SENDER = Address("", None)


@functools.lru_cache(maxsize=4096)
def parse_domain(text: str) -> Domain:
    """Parse a domain name or address literal; cached, as the same few domains
    arrive in RCPT after RCPT and an IDNA parse is not free."""
    name = text.strip()
    if not name:
        raise AddressError("empty domain")
    if name.startswith("["):
        return _literal(name)
    if not name.isascii():
        name = _a_labels(text, name)
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise AddressError(f"{text!r} is not a domain name: empty")
    key = name.lower()
    labels = key.split(".")
    for label in labels:
        if not _LDH_LABEL.fullmatch(label):
            raise AddressError(f"{text!r} is not a domain name: {_label_problem(label)}")
    display = key
    if any(label.startswith("xn--") for label in labels):
        display = ".".join(_u_label(text, label) for label in labels)
    if len(key) > MAX_DOMAIN:
        raise AddressError(f"{text!r} is not a domain name: longer than {MAX_DOMAIN} octets")
    return Domain(key, display)


def _a_labels(text: str, name: str) -> str:
    """UTS #46 mapping, then each non-ASCII label as its A-label; ASCII labels
    are left to the LDH rules, so a name and its A-label spelling are judged
    alike (``ab--cd.ä`` is ``ab--cd.xn--4ca``)."""
    try:
        mapped = idna.uts46_remap(name, std3_rules=True, transitional=False)
        return ".".join(label if label.isascii() else idna.alabel(label).decode("ascii")
                        for label in mapped.split("."))
    except UnicodeError as exc:  # idna.IDNAError, or text that is not Unicode
        raise AddressError(f"{text!r} is not a domain name: {exc}") from None


def _u_label(text: str, label: str) -> str:
    if not label.startswith("xn--"):
        return label
    try:
        return idna.decode(label)
    except UnicodeError as exc:
        raise AddressError(f"{text!r} is not a domain name: bad A-label {label!r}: {exc}") \
            from None


def _label_problem(label: str) -> str:
    if not label:
        return "empty label"
    if len(label) > 63:
        return f"label longer than 63 octets: {label[:20]!r}..."
    if label.startswith("-") or label.endswith("-"):
        return f"label {label!r} starts or ends with '-'"
    return f"label {label!r} has characters other than letters, digits and '-'"


def _literal(text: str) -> Domain:
    if not text.endswith("]") or len(text) < 3:
        raise AddressError(f"{text!r} is not an address literal: missing ']'")
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        elif ":" in inner:
            if not _GENERAL_LITERAL.fullmatch(inner):
                raise ValueError(inner)
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError(f"{text!r} is not an address literal") from None
    return Domain(text, text)


def parse_address(text: str) -> Address:
    """`local@domain` (the last `@` splits), or `""` for the null sender."""
    if text == "":
        return NULL_SENDER
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError(f"{text!r} is not an address: no '@domain'")
    if not local:
        raise AddressError(f"{text!r} is not an address: empty local part")
    if not domain:
        raise AddressError(f"{text!r} is not an address: empty domain")
    try:
        return Address(local, parse_domain(domain))
    except AddressError as exc:
        raise AddressError(f"{text!r} is not an address: {exc}") from None


def host_key(text: str) -> str | None:
    """The A-label key of a host name, None for a literal or anything malformed:
    what a hosted domain may be matched against."""
    try:
        domain = parse_domain(text)
    except AddressError:
        return None
    return None if domain.is_literal else domain.key


def destination_key(text: str) -> str:
    """The queue's destination for a domain: its key, or, for text that is no
    domain name, that text lower-cased, so a stored row never fails on it
    (such a destination simply never routes)."""
    try:
        return parse_domain(text).key
    except AddressError:
        return text.strip().lower().rstrip(".")
