"""What a callout adds to RCPT TO on loopback; printed as figures (not a test).

A `relay serve` subprocess is backup MX for bench.example with a live next
hop (a discard sink on 127.0.0.2 that answers every RCPT 250). One client
sends RCPT TO for ADDRESSES different addresses, one at a time, each timed
from the command to its reply:

1. `verify = "off"`: nothing checked (the baseline);
2. `verify = "callout"`, every address unknown: each RCPT is one probe
   (connect, EHLO, `MAIL FROM:<>`, `RCPT TO`; the reply comes before QUIT);
3. the same addresses again on that relay: the verdicts are cached.

p50 and p90 per case, and the added p50 of 2 and 3 over 1; with the load
average, as the machine is shared.

    .venv/bin/python bench/callout.py --addresses 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import HOST, SINK_HOST, DiscardSink, free_port, relay_cmd, relay_config, stop_process

LIMIT = 30.0  # seconds any one step may take before the benchmark gives up
BATCH = 100  # RCPTs per transaction (RSET and MAIL FROM between)


async def _reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = (await asyncio.wait_for(reader.readline(), LIMIT)).decode()
        if not line:
            raise ConnectionError("the relay closed the connection")
        if line[3:4] != "-":
            return line.rstrip()


async def rcpt_latencies(port: int, addresses: list[str]) -> list[float]:
    """Seconds from each RCPT TO to its reply; every reply must be 250."""
    reader, writer = await asyncio.open_connection(HOST, port)

    async def cmd(line: str) -> str:
        writer.write(line.encode() + b"\r\n")
        return await _reply(reader)

    assert (await _reply(reader)).startswith("220")
    assert (await cmd("EHLO bench.client")).startswith("250")
    took = []
    for n, address in enumerate(addresses):
        if n % BATCH == 0:
            assert (await cmd("RSET")).startswith("250")
            assert (await cmd("MAIL FROM:<bench@sender.example>")).startswith("250")
        started = time.perf_counter()
        reply = await cmd(f"RCPT TO:<{address}>")
        took.append(time.perf_counter() - started)
        if not reply.startswith("250"):
            raise RuntimeError(f"RCPT TO:<{address}>: {reply}")
    await cmd("QUIT")
    writer.close()
    return took


def start_relay(tmp: Path, name: str, sink_port: int,
                verify: str) -> tuple[subprocess.Popen[bytes], int]:
    """A migrated queue and `relay serve` on it, once it accepts connections."""
    port = free_port(HOST)
    config = tmp / f"{name}.toml"
    config.write_text(  # the domain's table is the last one relay_config writes
        relay_config(f"{HOST}:{port}", f"sqlite:///{tmp}/{name}.db", f"{SINK_HOST}:{sink_port}")
        + f'verify = "{verify}"\nverify_timeout = "5s"\n')
    subprocess.run(relay_cmd(config, "db", "upgrade"), check=True, capture_output=True)
    proc = subprocess.Popen(relay_cmd(config, "serve"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + LIMIT
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                error = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"relay did not start: {error}") from None
            time.sleep(0.05)  # polling a port that is not open yet


def figures(took: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in took)
    return {"p50_ms": round(statistics.median(ms), 3),
            "p90_ms": round(ms[int(len(ms) * 0.9) - 1], 3), "n": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--addresses", type=int, default=500)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    sink_port = free_port(SINK_HOST)
    sink = DiscardSink(SINK_HOST, sink_port)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-callout-") as name:
        tmp = Path(name)
        for verify in ("off", "callout"):
            proc, port = start_relay(tmp, verify, sink_port, verify)
            try:
                addresses = [f"user{n}.{verify}@bench.example" for n in range(args.addresses)]
                sessions = sink.sessions
                results[verify] = figures(asyncio.run(rcpt_latencies(port, addresses)))
                probes = sink.sessions - sessions
                if verify == "callout":
                    results["callout probes"] = probes
                    results["cached"] = figures(asyncio.run(rcpt_latencies(port, addresses)))
                    results["probes when cached"] = sink.sessions - sessions - probes
            finally:
                stop_process(proc)
    p50 = {case: figures_of["p50_ms"] for case, figures_of in results.items()
           if isinstance(figures_of, dict)}
    results["added p50 ms, callout"] = round(p50["callout"] - p50["off"], 3)
    results["added p50 ms, cached"] = round(p50["cached"] - p50["off"], 3)
    results["load average before, after"] = [round(x, 2) for x in (*load_before[:1],
                                                                   os.getloadavg()[0])]
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
