"""ETRN (RFC 1985): which requests start a flush of a hosted domain's mail, and
the reply each one gets.

Owns the checks in order (syntax, the client's right to ask, a hosted domain,
the per-client rate) and calling the service's flush. Refuses: queue access
(the service's `on_etrn` does it), the `#` queue-name form (answered 458, as
Postfix does), and whether a MAIL transaction is open (the session's state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from relay.core.address import host_key
from relay.smtp.shared import Settings, Shared

log = logging.getLogger("relay.smtp.server")


@dataclass(frozen=True, slots=True)
class EtrnAnswer:
    reply: str
    refused: str | None = None  # the rejection reason counted and logged, if refused


async def answer_etrn(arg: str, client_ip: str, settings: Settings, shared: Shared) -> EtrnAnswer:
    """Start the flush a well-formed, allowed ETRN asks for; the reply either way."""
    node = arg.strip()
    name = node[1:] if node[:1] in ("@", "#") else node
    if host_key(name) is None:  # either spelling: U-labels arrive as UTF-8
        return EtrnAnswer("501 5.5.4 Syntax: ETRN <domain>")
    if not settings.etrn_allowed(client_ip):
        return EtrnAnswer(f"459 4.7.1 Node {node} not allowed: access denied", "etrn")
    domain = None if node.startswith("#") else settings.policy.hosted(name)
    if domain is None:
        return EtrnAnswer(f"458 4.1.0 Unable to queue messages for node {node}: "
                          "not a hosted domain")
    if not shared.limits.allow_etrn(client_ip, domain):
        return EtrnAnswer(f"458 4.7.1 Unable to queue messages for node {node}: "
                          "too many ETRN requests, try again later", "etrn_rate")
    if shared.on_etrn is None:
        return EtrnAnswer(f"458 4.3.0 Unable to queue messages for node {node}")
    try:
        await shared.on_etrn(domain)
    except Exception as exc:
        log.error("ETRN %s from [%s] failed: %s", domain, client_ip, exc, exc_info=exc)
        return EtrnAnswer(f"458 4.3.0 Unable to queue messages for node {node}")
    log.info("ETRN %s from [%s]: queue flushed", domain, client_ip)
    return EtrnAnswer(f"250 2.0.0 Queuing for node {node} started")
