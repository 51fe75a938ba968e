"""Soak: the primary MX flapping up and down while mail arrives; printed as figures (not a test).

The reference deployment of SPEC on loopback (tests/support/deployment.py):
verrotech.com has MX 10 the primary (a sink on 127.0.0.2), MX 20 this relay
(`relay serve` as a subprocess on 127.0.0.3) and MX 30 Norwich (a sink on
127.0.0.4), served by the repo's DNS server. For `--minutes` the primary is
up for `--flap` seconds, then down (stopped: connections refused, open ones
cut) for `--flap` seconds, and so on, while a sender hands the relay
`--rate` messages a second, each with its own Message-ID. Then the primary
stays up until every acknowledged message has reached it.

Reports: acknowledged, lost (acknowledged, never delivered: must be 0),
duplicates at the primary against the `uncertain` attempts in the mail log
(a duplicate is only allowed where a delivery was uncertain), and what
Norwich, the less preferred MX, received (must be 0).

    .venv/bin/python bench/soak.py --minutes 10 --flap 20 --rate 5
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import tally_delivered  # noqa: E402

from tests.support.deployment import (  # noqa: E402
    NORWICH,
    PRIMARY,
    RELAY,
    add_zone,
    base_config,
    merge,
    to_toml,
)
from tests.support.dns_server import DnsServer  # noqa: E402
from tests.support.relay_process import RelayProcess, free_port  # noqa: E402
from tests.support.smtp_sink import Sink  # noqa: E402

MESSAGE_ID = re.compile(rb"^Message-ID: <(soak-[0-9x]+)@sender\.example>", re.M | re.I)


def message(n: int) -> bytes:
    return (f"From: <s@sender.example>\r\nTo: <alice@verrotech.com>\r\nSubject: soak {n}\r\n"
            f"Message-ID: <soak-{n}@sender.example>\r\n\r\nsoak message {n}\r\n").encode()


class Sender(threading.Thread):
    """One message per session at `rate` a second; remembers what got 250."""

    def __init__(self, port: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, 1.0 / rate
        self.acknowledged: list[str] = []
        self.refused: collections.Counter[str] = collections.Counter()
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self.stopping.is_set():
            n += 1
            try:
                with smtplib.SMTP(RELAY, self.port, timeout=60) as client:
                    client.sendmail("s@sender.example", ["alice@verrotech.com"], message(n))
                self.acknowledged.append(f"soak-{n}")
            except smtplib.SMTPException as exc:
                self.refused[type(exc).__name__] += 1
            except OSError as exc:
                self.refused[type(exc).__name__] += 1
            next_at += self.interval
            self.stopping.wait(max(0.0, next_at - time.monotonic()))  # the sending rate


def ids(sink: Sink) -> list[str]:
    """Message-IDs of every message the sink received, answered or not."""
    found = []
    for received in sink.received:
        match = MESSAGE_ID.search(received.data)
        if match:
            found.append(match[1].decode())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--flap", type=float, default=20.0, help="seconds up, then down")
    parser.add_argument("--rate", type=float, default=5.0, help="messages a second")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds allowed at the end")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    dns = DnsServer().start()
    add_zone(dns)
    mx_port = free_port(PRIMARY, NORWICH)
    relay_port = free_port(RELAY)
    primary = Sink(PRIMARY, mx_port, hostname="mail.verrotech.com").start()
    norwich = Sink(NORWICH, mx_port, hostname="mail.noc.verrotech.com").start()
    config = tmp / "relay.toml"
    config.write_text(to_toml(merge(base_config(tmp, relay_port, mx_port, dns.address), {
        "smtp": {"max_messages_per_ip_per_minute": 0},
        "delivery": {"min_backoff": "1s", "max_backoff": "10s"},
    })))
    relay = RelayProcess(config).start()
    sender = Sender(relay_port, args.rate)
    began = time.monotonic()
    load_start = os.getloadavg()
    sender.start()
    flaps = 0
    try:
        end = began + args.minutes * 60
        up = True
        while time.monotonic() < end:
            time.sleep(min(args.flap, max(0.0, end - time.monotonic())))  # the flapping period
            if time.monotonic() >= end:
                break
            if up:
                primary.stop()
            else:
                primary.start()
            up = not up
            flaps += 1
        sender.stopping.set()
        sender.join()
        primary.start()
        acknowledged = set(sender.acknowledged)
        tally = tally_delivered(acknowledged, lambda: ids(primary), args.drain)
        drained, lost, duplicates = tally.drained, tally.lost, tally.duplicates
        load_end = os.getloadavg()
        uncertain = relay.count(r": uncertain\b")
        queue_left = len(relay.queue_list())
        print(f"soak: {args.minutes:g} min, primary flapped {flaps} times every {args.flap:g} s, "
              f"sender at {args.rate:g}/s")
        print(f"  acknowledged {len(acknowledged)}, refused by the relay "
              f"{sum(sender.refused.values())} {dict(sender.refused)}")
        print(f"  lost {len(lost)} {lost[:10]}")
        print(f"  duplicates at the primary {duplicates}; uncertain attempts in the mail log "
              f"{uncertain}")
        print(f"  delivered to the less preferred MX (Norwich): {len(norwich.received)}")
        print(f"  drained {drained:.1f} s after the last flap; left in the queue {queue_left}")
        print(f"  load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} "
              f"{load_end[1]:.2f} {load_end[2]:.2f}")
        failed = lost or len(norwich.received) or duplicates > uncertain or queue_left
        sys.exit(1 if failed else 0)
    finally:
        sender.stopping.set()
        relay.stop_quietly()
        primary.close()
        norwich.close()
        dns.stop()


if __name__ == "__main__":
    main()
