"""SIGHUP to a real `relay serve` process (systemd's ExecReload): the config is
re-read without dropping a session; what does not validate and what needs a
restart leave the relay running as it was, and the log says so."""

from __future__ import annotations

import re
import signal
import smtplib

from tests.support.deployment import RELAY, Deployment, message
from tests.support.relay_process import RelayProcess, free_port


def hangup(relay: RelayProcess, reloads: int) -> None:
    """SIGHUP, then wait until the relay has logged `reloads` reloads in all."""
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for(r"relay\.service: (reloaded |reload of .* refused)", count=reloads)


def test_a_session_open_across_sighup_keeps_working_and_new_sessions_take_the_new_domain(
    deployment: Deployment,
) -> None:
    relay = deployment.relay().start()
    with smtplib.SMTP(RELAY, deployment.relay_port, timeout=10) as before:
        before.ehlo("client.sender.example")
        before.mail("s@sender.example")
        assert before.rcpt("alice@verrotech.com")[0] == 250

        deployment.write_config(domains={"hosted-later.example": {}})
        hangup(relay, 1)
        assert relay.count(f"reloaded {re.escape(str(deployment.config))}: changed domains") == 1

        assert before.rcpt("bob@hosted-later.example")[0] == 554  # its session's config
        code, reply = before.data(message(1))
        assert code == 250, reply

    with smtplib.SMTP(RELAY, deployment.relay_port, timeout=10) as after:
        after.ehlo("client.sender.example")
        after.mail("s@sender.example")
        assert after.rcpt("bob@hosted-later.example")[0] == 250
        assert after.rcpt("alice@verrotech.com")[0] == 250
        assert after.data(message(2))[0] == 250
    assert relay.terminate() == 0


def test_a_bad_config_on_sighup_is_refused_and_the_old_domains_still_accepted(
    deployment: Deployment,
) -> None:
    relay = deployment.relay().start()
    deployment.write_config(smtp={"max_recipients": 0}, domains={"hosted-later.example": {}})
    hangup(relay, 1)
    config = re.escape(str(deployment.config))
    assert relay.count(f"reload refused: {config}: smtp.max_recipients: Input should be "
                       "greater than or equal to 1") == 1
    assert relay.count(f"reload of {config} refused \\(1 problem\\): the config in force "
                       "stays") == 1
    assert relay.proc is not None and relay.proc.poll() is None
    with smtplib.SMTP(RELAY, deployment.relay_port, timeout=10) as client:
        client.ehlo("client.sender.example")
        client.mail("s@sender.example")
        assert client.rcpt("alice@verrotech.com")[0] == 250
        assert client.rcpt("bob@hosted-later.example")[0] == 554
    assert relay.terminate() == 0


def test_a_changed_listen_address_logs_that_it_needs_a_restart(deployment: Deployment) -> None:
    relay = deployment.relay().start()
    moved = free_port(RELAY)
    deployment.write_config(smtp={"listen": [f"{RELAY}:{moved}"]})
    hangup(relay, 1)
    assert relay.count(r"reload: smtp\.listen: changed in .*, needs a restart") == 1
    with smtplib.SMTP(RELAY, deployment.relay_port, timeout=10) as client:  # still here
        assert client.noop()[0] == 250
    assert relay.terminate() == 0
