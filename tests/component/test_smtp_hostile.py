"""Hostile and careless clients over real loopback sockets: old TLS versions,
early talkers, plaintext from networks that must use TLS, ETRN floods, idle
and slow connections."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.core.clock import FakeClock
from relay.core.config import ConfigError
from relay.queue.rows import NewMessage
from relay.smtp.listeners import Listeners, start_listeners, tls_context
from relay.smtp.policy import Policy
from tests.component.test_smtpd import BODY, HOST, T0, Client, Ids, make_config

Start = Callable[..., Awaitable[Listeners]]


@pytest.fixture
def stored() -> list[NewMessage]:
    return []


@pytest.fixture
async def start(tmp_path: Path, stored: list[NewMessage]) -> AsyncIterator[Start]:
    running: list[Listeners] = []

    async def start_relay(smtp: dict[str, Any] | None = None,
                          clock: FakeClock | None = None) -> Listeners:
        config = make_config(tmp_path, smtp)

        async def submit(message: NewMessage) -> None:
            stored.append(message)

        async def on_etrn(domain: str) -> None:
            return None

        listeners = await start_listeners(config, submit, id_factory=Ids(),
                                          clock=clock or FakeClock(T0), on_etrn=on_etrn,
                                          policy=Policy(config, recheck_interval=0))
        running.append(listeners)
        return listeners

    yield start_relay
    for listeners in running:
        listeners.abort()
        await listeners.wait_closed()


@pytest.fixture
def ca(tmp_path: Path) -> trustme.CA:
    authority = trustme.CA()
    authority.issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "cert.pem"))
    return authority


TLS = {"tls_cert": "cert.pem", "tls_key": "cert.pem"}


async def greeted(listeners: Listeners) -> Client:
    client = await Client.connect(listeners.addresses[0])
    assert (await client.reply()).code == 220
    assert (await client.ehlo()).code == 250
    return client


# -- inbound TLS -------------------------------------------------------------------


def test_the_server_context_refuses_old_tls_compression_and_client_cipher_order(
        tmp_path: Path, ca: trustme.CA) -> None:
    context = tls_context(make_config(tmp_path, TLS))
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE


def client_context(ca: trustme.CA, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.minimum_version = context.maximum_version = version
    return context


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_1_2_and_1_3_clients_get_their_version(
        start: Start, ca: trustme.CA, version: ssl.TLSVersion,
        stored: list[NewMessage]) -> None:
    listeners = await start(TLS)
    client = await greeted(listeners)
    assert (await client.cmd("STARTTLS")).code == 220
    await client.writer.start_tls(client_context(ca, version), server_hostname=HOST)
    tls = client.writer.get_extra_info("ssl_object")
    assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                             ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert (await client.ehlo()).code == 250
    assert (await client.transaction("a@b.example", ["bob@verrotech.com"], BODY)).code == 250
    assert len(stored) == 1
    await client.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_a_tls_1_1_client_is_refused(start: Start, ca: trustme.CA) -> None:
    listeners = await start(TLS)
    client = await greeted(listeners)
    assert (await client.cmd("STARTTLS")).code == 220
    context = client_context(ca, ssl.TLSVersion.TLSv1_1)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # this client would take TLS 1.1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await client.writer.start_tls(context, server_hostname=HOST)
    await client.close()
    assert await listeners.wait_sessions(20)
    other = await greeted(listeners)  # the failed handshake hurt no one else
    assert (await other.cmd("NOOP")).code == 250
    await other.close()


# -- early talkers -------------------------------------------------------------------


async def test_an_early_talker_hears_554_and_is_dropped(start: Start) -> None:
    listeners = await start({"greet_pause": "0.3s"})
    client = await Client.connect(listeners.addresses[0])
    await client.send(b"EHLO spam.example\r\n")  # without waiting for the greeting
    assert (await client.reply()).last == (
        f"554 5.5.0 {HOST} Error: protocol violation (data sent before the greeting)")
    assert await client.at_eof() == b""
    await client.close()
    assert listeners.stats.rejections["early_talker"] == 1


async def test_a_client_that_waits_for_the_greeting_is_served(
        start: Start, stored: list[NewMessage]) -> None:
    listeners = await start({"greet_pause": "0.3s"})
    client = await greeted(listeners)
    assert (await client.transaction("a@b.example", ["bob@verrotech.com"], BODY)).code == 250
    assert len(stored) == 1
    assert listeners.stats.rejections["early_talker"] == 0
    await client.close()


# -- smtp.require_tls_from ---------------------------------------------------------


async def test_a_network_that_must_use_tls_cannot_send_in_plaintext(
        start: Start, ca: trustme.CA, stored: list[NewMessage]) -> None:
    listeners = await start({**TLS, "require_tls_from": ["127.0.0.0/8"]})
    client = await greeted(listeners)
    assert (await client.cmd("MAIL FROM:<a@b.example>")).last == (
        "530 5.7.0 Must issue a STARTTLS command first")
    assert (await client.cmd("STARTTLS")).code == 220
    await client.writer.start_tls(client_context(ca, ssl.TLSVersion.TLSv1_3),
                                  server_hostname=HOST)
    assert (await client.ehlo()).code == 250
    assert (await client.transaction("a@b.example", ["bob@verrotech.com"], BODY)).code == 250
    assert len(stored) == 1
    assert listeners.stats.rejections["tls_required"] == 1
    await client.close()


async def test_other_networks_may_still_send_in_plaintext(
        start: Start, stored: list[NewMessage], ca: trustme.CA) -> None:
    listeners = await start({**TLS, "require_tls_from": ["192.0.2.0/24"]})
    client = await greeted(listeners)
    assert (await client.transaction("a@b.example", ["bob@verrotech.com"], BODY)).code == 250
    assert len(stored) == 1
    await client.close()


def test_require_tls_from_without_a_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="smtp: require_tls_from needs tls_cert and tls_key"):
        make_config(tmp_path, {"require_tls_from": ["127.0.0.1"]})


# -- ETRN rate ---------------------------------------------------------------------


async def test_etrn_for_one_domain_is_taken_once_per_interval(start: Start) -> None:
    clock = FakeClock(T0)
    listeners = await start({"etrn_clients": ["127.0.0.0/8"], "etrn_interval": "10s"}, clock)
    client = await greeted(listeners)
    assert (await client.cmd("ETRN verrotech.com")).code == 250
    assert (await client.cmd("ETRN verrotech.com")).last == (
        "458 4.7.1 Unable to queue messages for node verrotech.com: "
        "too many ETRN requests, try again later")
    assert (await client.cmd("ETRN verrotech.org")).code == 250  # another domain
    clock.advance(9.9)
    assert (await client.cmd("ETRN verrotech.com")).code == 458
    clock.advance(0.1)
    assert (await client.cmd("ETRN verrotech.com")).code == 250
    assert listeners.stats.rejections["etrn_rate"] == 2
    await client.close()


# -- many connections --------------------------------------------------------------


async def test_connections_over_the_limit_hear_421_and_a_sender_still_gets_through(
        start: Start, stored: list[NewMessage]) -> None:
    listeners = await start({"max_connections": 100, "max_connections_per_ip": 1000})
    idle = [await Client.connect(listeners.addresses[0]) for _ in range(99)]
    assert {(await c.reply()).code for c in idle} == {220}
    sender = await greeted(listeners)  # the last slot
    refused = [await Client.connect(listeners.addresses[0]) for _ in range(100)]
    for client in refused:
        assert (await client.reply()).last == (
            f"421 4.7.0 {HOST} Error: too many connections from 127.0.0.1")
        assert await client.at_eof() == b""
        await client.close()
    assert (await sender.transaction("a@b.example", ["bob@verrotech.com"], BODY)).code == 250
    assert len(stored) == 1
    assert listeners.stats.rejections["connection_limit"] == 100
    for client in [*idle, sender]:
        await client.close()
