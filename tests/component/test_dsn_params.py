"""RFC 3461 DSN parameters end to end, over real loopback SMTP: accepted and
refused at MAIL/RCPT, stored and shown by `queue show --json`, passed on
unchanged to a next hop that offers DSN, and, to one that does not, kept
back and answered with our own DSNs (`relayed`, NOTIFY=NEVER, RET=HDRS)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flufl.bounce import all_failures

from relay import service
from relay.core import config as configuration
from relay.ops.cli.main import command_tree, main_group
from tests.support.deployment import merge, to_toml
from tests.support.log_lines import LogLines
from tests.support.relay_process import free_port
from tests.support.smtp_lines import LineClient, Reply
from tests.support.smtp_sink import ReceivedMessage, Sink

command_tree()

DOMAIN = "company.example"
DEADLINE = 15.0
T0 = datetime(2026, 5, 1, tzinfo=UTC)
SENDER = f"alice@{DOMAIN}"  # hosted too: our DSNs to her reach the same sink
BODY = b"Subject: hi\r\nMessage-ID: <m1@company.example>\r\n\r\nThe secret body.\r\n"


@pytest.fixture
def sink() -> Iterator[Sink]:
    primary = Sink().start()
    yield primary
    primary.stop()


@pytest.fixture
async def relay(tmp_path: Path, sink: Sink) -> AsyncIterator[Callable[..., Any]]:
    """`relay serve` in this process, delivering `company.example` to the sink."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start(**overrides: Any) -> tuple[int, Path]:
        port = free_port("127.0.0.1")
        settings = merge({
            "node": {"hostname": "mx2.example"},
            "smtp": {"listen": [f"127.0.0.1:{port}"]},
            "queue": {"url": f"sqlite:///{tmp_path}/queue.db"},
            "delivery": {"min_backoff": "1s", "max_backoff": "1s", "connect_timeout": "2s"},
            "dns": {"nameservers": ["127.0.0.1:1"], "timeout": "1s"},
            "metrics": {"listen": ""},
            "domains": {DOMAIN: {"next_hop": f"127.0.0.1:{sink.port}"}},
        }, overrides)
        path = tmp_path / "relay.toml"
        path.write_text(to_toml(settings))
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(service.serve(
            configuration.load(str(path)), config_path=str(path), stop=stop,
            on_ready=ready.set, poll_interval=0.2)))
        await asyncio.wait_for(ready.wait(), DEADLINE)
        return port, path

    yield start
    stop.set()
    for task in tasks:
        await asyncio.wait_for(task, 60)


class Client(LineClient[str]):
    """Replies as their lines, joined."""

    deadline = DEADLINE

    @classmethod
    async def open(cls, port: int) -> Client:
        return await cls.greeted(port)

    def shaped(self, reply: Reply) -> str:
        return "\n".join(reply.raw)


async def send(port: int, mail: str, *rcpts: str) -> str:
    """One transaction; the queue ID."""
    client = await Client.open(port)
    assert "DSN" in (await client.cmd("EHLO client.example")).splitlines()[-1]
    assert await client.cmd(f"MAIL FROM:<{SENDER}>{mail}") == "250 2.1.0 Ok"
    for rcpt in rcpts:
        assert await client.cmd(f"RCPT TO:{rcpt}") == "250 2.1.5 Ok", rcpt
    assert (await client.cmd("DATA")).startswith("354")
    reply = await client.cmd(BODY.decode() + ".")
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    await client.close()
    return reply.rsplit(" ", 1)[1]


def show_json(path: Path, queue_id: str) -> dict[str, Any]:
    result = CliRunner().invoke(main_group, ["queue", "show", queue_id, "--json", "-c", str(path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    obj: dict[str, Any] = json.loads(result.stdout)
    return obj


def report(message: ReceivedMessage) -> Message:
    return email.message_from_bytes(message.data, policy=email.policy.default)


def status_blocks(msg: Message) -> list[Message]:
    (part,) = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


async def test_bad_or_repeated_parameters_get_501_and_change_nothing(
    relay: Callable[..., Any], sink: Sink,
) -> None:
    sink.hold_data()  # nothing delivered: the queue keeps what was stored
    port, path = await relay()
    client = await Client.open(port)
    ehlo = await client.cmd("EHLO client.example")
    assert ehlo.splitlines()[-1] == "250 DSN"
    for bad, reply in [
        ("RET=ALL", "501 5.5.4 Bad RET parameter: FULL or HDRS expected"),
        ("RET=FULL RET=HDRS", "501 5.5.4 Repeated RET parameter"),
        ("ENVID=a+zz", "501 5.5.4 Bad ENVID parameter: Bad xtext: '+' must be followed by two"
                       " upper-case hex digits"),
    ]:
        assert await client.cmd(f"MAIL FROM:<{SENDER}> {bad}") == reply
    assert await client.cmd(f"MAIL FROM:<{SENDER}> ret=hdrs ENVID=Q+2B1") == "250 2.1.0 Ok"
    for bad, reply in [
        ("NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY parameter: NEVER, or SUCCESS, FAILURE,"
                                 " DELAY"),
        ("NOTIFY=DELAY NOTIFY=DELAY", "501 5.5.4 Repeated NOTIFY parameter"),
        ("ORCPT=rfc822;a@b ORCPT=rfc822;a@b", "501 5.5.4 Repeated ORCPT parameter"),
        ("ORCPT=bob", "501 5.5.4 Bad ORCPT parameter: addr-type;address expected"),
    ]:
        assert await client.cmd(f"RCPT TO:<carol@{DOMAIN}> {bad}") == reply
    assert await client.cmd(f"RCPT TO:<bob@{DOMAIN}> NOTIFY=success,failure"
                            f" ORCPT=rfc822;Bob+2Bx@{DOMAIN}") == "250 2.1.5 Ok"
    assert await client.cmd(f"RCPT TO:<dan@{DOMAIN}>") == "250 2.1.5 Ok"
    assert (await client.cmd("DATA")).startswith("354")
    queued = await client.cmd(BODY.decode() + ".")
    await client.close()

    shown = show_json(path, queued.rsplit(" ", 1)[1])
    assert [(r["address"], r["notify"], r["orcpt"]) for r in shown["recipients"]] == [
        (f"bob@{DOMAIN}", ["SUCCESS", "FAILURE"], f"rfc822;Bob+2Bx@{DOMAIN}"),
        (f"dan@{DOMAIN}", None, None),  # carol's refused RCPTs left nothing behind
    ]
    text = CliRunner().invoke(main_group, ["queue", "show", shown["id"], "-c", str(path)],
                              catch_exceptions=False).stdout
    assert f"    NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx@{DOMAIN}\n" in text
    assert text.count("NOTIFY=") == 1
    sink.release_data()


async def test_a_next_hop_offering_dsn_gets_the_parameters_unchanged(
    relay: Callable[..., Any], sink: Sink, mail_log: LogLines,
) -> None:
    sink.dsn = True
    port, _ = await relay()
    await send(port, " RET=HDRS ENVID=QX+2B1", f"<bob@{DOMAIN}> NOTIFY=SUCCESS,FAILURE"
               f" ORCPT=rfc822;Bob+2Bx@{DOMAIN}", f"<dan@{DOMAIN}>")
    await mail_log.wait(lambda: mail_log.count(": delivered ") == 2)
    [message] = sink.received
    assert message.dsn_mail == ("RET=HDRS", "ENVID=QX+2B1")
    assert message.dsn_rcpt == (
        (f"bob@{DOMAIN}", ("NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;Bob+2Bx@{DOMAIN}")),
        (f"dan@{DOMAIN}", ()),
    )
    assert mail_log.count(": dsn ") == 0  # success notices are the next hop's to send


async def test_a_next_hop_without_dsn_gets_none_and_we_report(
    relay: Callable[..., Any], sink: Sink, mail_log: LogLines,
) -> None:
    sink.rcpt_reply[f"carol@{DOMAIN}"] = "550 5.1.1 no such user"
    sink.rcpt_reply[f"dan@{DOMAIN}"] = "550 5.1.1 no such user"
    port, _ = await relay()
    queue_id = await send(
        port, " RET=HDRS ENVID=QX+2B1",
        f"<bob@{DOMAIN}> NOTIFY=SUCCESS ORCPT=rfc822;Bob+2Bx@{DOMAIN}",
        f"<carol@{DOMAIN}> NOTIFY=NEVER", f"<dan@{DOMAIN}>")
    # the message, then a `relayed` report for bob and a failure report for dan
    received = await sink.await_messages(3, DEADLINE)
    original = received[0]
    assert original.recipients == (f"bob@{DOMAIN}",)  # aiosmtpd would refuse DSN parameters
    reports = {m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]: m for m in received[1:]}
    assert all(m.sender == "" and m.recipients == (SENDER,) for m in received[1:])

    relayed = report(reports[b"Successful Mail Delivery Report"])
    per_message, bob = status_blocks(relayed)
    assert per_message["Original-Envelope-Id"] == "QX+1"
    assert (bob["Original-Recipient"], bob["Final-Recipient"]) == (
        f"rfc822; Bob+x@{DOMAIN}", f"rfc822; bob@{DOMAIN}")
    assert (bob["Action"], bob["Status"]) == ("relayed", "2.0.0")

    failed_data = reports[b"Undelivered Mail Returned to Sender"].data
    failed = report(reports[b"Undelivered Mail Returned to Sender"])
    _, dan = status_blocks(failed)  # carol said NEVER: not in any report
    assert (dan["Final-Recipient"], dan["Action"]) == (f"rfc822; dan@{DOMAIN}", "failed")
    assert all_failures(email.message_from_bytes(failed_data)) == (
        frozenset(), {f"dan@{DOMAIN}".encode()})
    payload = failed.get_payload()
    assert isinstance(payload, list)
    assert payload[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS
    assert b"The secret body." not in failed_data
    await mail_log.wait(lambda: mail_log.count(f"{queue_id}: dsn ") == 2)
    assert mail_log.count("kind=relayed") == 1 and mail_log.count("kind=failed") == 1


async def test_a_utf8_orcpt_goes_7bit_to_a_hop_without_smtputf8(
    relay: Callable[..., Any], sink: Sink, mail_log: LogLines,
) -> None:
    sink.dsn, sink.smtputf8 = True, False  # an all-ASCII message may still go there
    port, _ = await relay()
    await send(port, " SMTPUTF8", f"<bob@{DOMAIN}> ORCPT=utf-8;jörg@{DOMAIN}")
    await mail_log.wait(lambda: mail_log.count(": delivered ") == 1)
    [message] = sink.received
    assert not message.smtputf8
    assert message.dsn_rcpt == ((f"bob@{DOMAIN}", (f"ORCPT=utf-8;j\\x{{F6}}rg@{DOMAIN}",)),)
