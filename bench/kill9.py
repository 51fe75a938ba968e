"""kill -9 during load, restart, again; printed as figures (not a test).

The reference deployment on loopback (as bench/soak.py: the primary MX is a
sink on 127.0.0.2, `relay serve` a subprocess on 127.0.0.3, the repo's DNS
server). `--senders` threads hand the relay messages as fast as it takes
them, each with its own Message-ID, while deliveries to the primary go on.
Every `--interval` seconds the relay gets SIGKILL and is started again on the
same queue, `--kills` times. At each kill the senders inside a session and
the primary's open connections are counted: the sessions in flight.

At the end: every acknowledged message must have reached the primary (lost:
0), and the duplicates there may not exceed the sessions in flight at the
kills (only a delivery cut between the primary's reply and our commit of it
is sent twice).

    .venv/bin/python bench/kill9.py --kills 5 --interval 5 --senders 10
"""

from __future__ import annotations

import argparse
import collections
import os
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
from soak import ids  # noqa: E402

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


def message(n: str) -> bytes:
    return (f"From: <s@sender.example>\r\nTo: <alice@verrotech.com>\r\nSubject: kill9 {n}\r\n"
            f"Message-ID: <soak-{n}@sender.example>\r\n\r\n" + ("x" * 76 + "\r\n") * 26).encode()


class Senders:
    """`count` threads, one message per session, as fast as the relay answers."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.acknowledged: list[str] = []
        self.failed: collections.Counter[str] = collections.Counter()
        self.inside = 0  # threads inside a session now
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(count)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def _run(self, index: int) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            name = f"{index}x{n}"  # as soak.py's MESSAGE_ID reads them
            with self.lock:
                self.inside += 1
            try:
                with smtplib.SMTP(RELAY, self.port, timeout=60) as client:
                    client.sendmail("s@sender.example", ["alice@verrotech.com"], message(name))
                with self.lock:
                    self.acknowledged.append(f"soak-{name}")
            except (smtplib.SMTPException, OSError) as exc:
                self.failed[type(exc).__name__] += 1
                self.stopping.wait(0.2)  # the relay is restarting: a sender backs off
            finally:
                with self.lock:
                    self.inside -= 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds of load between kills")
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--drain", type=float, default=300.0)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kill9-"))
    dns = DnsServer().start()
    add_zone(dns)
    mx_port = free_port(PRIMARY, NORWICH)
    relay_port = free_port(RELAY)
    primary = Sink(PRIMARY, mx_port, hostname="mail.verrotech.com").start()
    config = tmp / "relay.toml"
    config.write_text(to_toml(merge(base_config(tmp, relay_port, mx_port, dns.address), {
        "smtp": {"max_messages_per_ip_per_minute": 0, "max_connections_per_ip": 1000},
        "delivery": {"min_backoff": "1s", "max_backoff": "5s"},
        "queue": {"lease": "10s"},  # a killed node's deliveries come back after this
    })))
    relay = RelayProcess(config).start(timeout=60)
    senders = Senders(relay_port, args.senders)
    load_start = os.getloadavg()
    senders.start()
    in_flight: list[tuple[int, int, int]] = []  # (inbound sessions, primary connections, acked)
    try:
        for _ in range(args.kills):
            time.sleep(args.interval)  # load runs this long before the kill
            with senders.lock:
                inbound = senders.inside
                acked = len(senders.acknowledged)
            outbound = len(primary._transports)  # deliveries open right now
            relay.kill()
            in_flight.append((inbound, outbound, acked))
            relay = RelayProcess(config).start(timeout=60)
        time.sleep(args.interval)  # load after the last restart
        senders.stop()
        acknowledged = set(senders.acknowledged)
        tally = tally_delivered(acknowledged, lambda: ids(primary), args.drain)
        drained, got, lost, duplicates = tally.drained, tally.got, tally.lost, tally.duplicates
        load_end = os.getloadavg()
        unacknowledged_delivered = len(set(got) - acknowledged)
        flight = sum(i + o for i, o, _ in in_flight)
        queue_left = len(relay.queue_list())
        print(f"kill9: {args.kills} kills every {args.interval:g} s, {args.senders} senders")
        print(f"  at each kill (inbound sessions, primary connections, acknowledged so far): "
              f"{in_flight}")
        print(f"  acknowledged {len(acknowledged)}, failed sessions {sum(senders.failed.values())} "
              f"{dict(senders.failed)}")
        print(f"  lost {len(lost)} {lost[:10]}")
        print(f"  duplicates at the primary {duplicates} (sessions in flight at the kills: "
              f"{flight}); delivered though never acknowledged {unacknowledged_delivered}")
        print(f"  drained {drained:.1f} s after the load; left in the queue {queue_left}")
        print(f"  load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} "
              f"{load_end[1]:.2f} {load_end[2]:.2f}")
        sys.exit(1 if lost or duplicates > flight or queue_left else 0)
    finally:
        senders.stopping.set()
        relay.stop_quietly()
        primary.close()
        dns.stop()


if __name__ == "__main__":
    main()
