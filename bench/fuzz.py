"""Long-run fuzzing of the accept side's parsers with atheris (coverage-guided).

Not a test: a run of `--runs` inputs (default 1,000,000) that prints what it
did and exits 0, or stops at the first crash (an exception none of the
parsers documents, or a broken invariant) and exits non-zero with the input.
Each input drives one target, chosen by its first byte:

* path: `split_path` on the text after `MAIL FROM:` / `RCPT TO:`, then
  `sender_address`, `Policy.check_recipient`, `host_key`, `destination_key`
  (documented failures: `PathSyntaxError`, `AddressError`);
* data: `DataReceiver` fed the same bytes in one piece and in pieces cut where
  the input says: the end offset and the problem must not depend on the cuts,
  and data without a problem must equal a reference unstuffing;
* header: `count_received`, `printable`, `valid_utf8`, `enhance` and
  `received_header`, whose result must be a header with no bare CR or LF.

A hang is an input slower than `--hang` seconds (libFuzzer's `-timeout`); the
slowest input is reported. Whole SMTP sessions are fuzzed separately, over
loopback, by `tests/component/test_smtp_fuzz.py` (`--sessions` runs it longer).

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python bench/fuzz.py --runs 1000000
    .venv/bin/python bench/fuzz.py --sessions 5000   # the session fuzzer, longer
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

with atheris.instrument_imports():
    from relay.core.address import AddressError, destination_key, host_key, parse_address
    from relay.core.config import from_mapping
    from relay.smtp.data import DataReceiver
    from relay.smtp.policy import PathSyntaxError, Policy, sender_address, split_path
    from relay.smtp.replies import (
        count_received,
        enhance,
        printable,
        received_header,
        valid_utf8,
    )

from datetime import UTC, datetime  # noqa: E402

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TARGETS = ("path", "data", "header")
counts: Counter[str] = Counter()
slowest = [0.0, b""]
began = time.monotonic()
REPORT_EVERY = 100_000
RUNS = [0]
calls = [0]


def make_policy() -> Policy:
    config = from_mapping({
        "node": {"hostname": "mx.example"},
        "domains": {"example.com": {"recipients": ["bob", "alice@example.com"]},
                    "xn--bcher-kva.example": {}, "open.example": {}},
    }, env={}, base=ROOT)
    return Policy(config, recheck_interval=0)


POLICY = make_policy()


def fuzz_path(raw: bytes) -> None:
    text = raw.decode("utf-8", "surrogateescape")
    try:
        path, params = split_path(text)
    except PathSyntaxError:
        return
    assert "\r" not in path and "\n" not in path, path
    assert all(p and not any(c.isspace() for c in p) for p in params), params
    with contextlib.suppress(PathSyntaxError):
        sender_address(path)
    POLICY.check_recipient(path)
    host_key(path.rpartition("@")[2])
    destination_key(path.rpartition("@")[2])
    with contextlib.suppress(AddressError):
        parse_address(path)


def reference(stream: bytes) -> tuple[int, bytes | None]:
    """Where the data ends (-1: not yet) and its lines unstuffed."""
    if stream.startswith(b".\r\n"):
        return 3, b""
    end = stream.find(b"\r\n.\r\n")
    if end < 0:
        return -1, None
    lines = stream[:end + 2]
    unstuffed = b"".join(line[1:] if line.startswith(b".") else line
                         for line in lines.split(b"\r\n")[:-1] for line in [line + b"\r\n"])
    return end + 5, unstuffed


def feed_all(stream: bytes, cuts: list[int], max_size: int) -> tuple[int, str | None, bytes]:
    receiver = DataReceiver(max_size)
    offset, last = 0, 0
    for cut in [*cuts, len(stream)]:
        piece = stream[last:cut]
        end = receiver.feed(piece) if piece else -1
        if end >= 0:
            offset += end
            return offset, receiver.problem, b"".join(receiver.blocks)
        offset += len(piece)
        last = cut
    return -1, receiver.problem, b"".join(receiver.blocks)


def fuzz_data(fdp: atheris.FuzzedDataProvider) -> None:
    max_size = fdp.ConsumeIntInRange(0, 4000)
    ncuts = fdp.ConsumeIntInRange(0, 8)
    cuts_raw = [fdp.ConsumeIntInRange(0, 4096) for _ in range(ncuts)]
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    if fdp.remaining_bytes() == 0 and len(stream) < 2048 and stream.count(b"\n") > 0:
        stream = stream.replace(b"\n", b"\r\n")  # more lines, more dots at line starts
    cuts = sorted({min(c, len(stream)) for c in cuts_raw})
    whole = feed_all(stream, [], max_size)
    split = feed_all(stream, cuts, max_size)
    assert whole[0] == split[0], (whole, split, cuts)
    assert (whole[1] is None) == (split[1] is None), (whole, split, cuts)
    if whole[1] is None:
        assert whole[2] == split[2], (whole, split, cuts)
        end, unstuffed = reference(stream)
        assert whole[0] == end, (whole, end)
        if end >= 0:
            assert whole[2] == unstuffed, (whole, unstuffed)


def fuzz_header(fdp: atheris.FuzzedDataProvider) -> None:
    helo = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))
    rcpt = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 100))
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:  # a recipient reaches the header only through split_path
        rcpt = split_path(f"<{rcpt}>")[0]
    except PathSyntaxError:
        rcpt = ""
    count_received(data, 0)
    valid_utf8(helo)
    shown = printable(helo)
    assert shown.isprintable() or not shown, shown
    reply = enhance(helo)
    assert isinstance(reply, str)
    header = received_header(helo, "127.0.0.1", "mx.example", "ESMTP", "01TEST",
                             [rcpt] if rcpt else [], NOW)
    body = header.replace(b"\r\n\t", b"")  # folding is the only line break inside it
    assert body.endswith(b"\r\n") and b"\r" not in body[:-2] and b"\n" not in body[:-2], header


def one_input(data: bytes) -> None:
    calls[0] += 1
    if calls[0] % REPORT_EVERY == 0 or calls[0] == RUNS[0]:  # libFuzzer's exit skips atexit
        report()
    if not data:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    counts[target] += 1
    started = time.monotonic()
    if target == "path":
        fuzz_path(data[1:])
    else:
        fdp = atheris.FuzzedDataProvider(data[1:])
        fuzz_data(fdp) if target == "data" else fuzz_header(fdp)
    took = time.monotonic() - started
    if took > slowest[0]:
        slowest[0], slowest[1] = took, data


def report() -> None:
    total = calls[0]
    elapsed = time.monotonic() - began
    load = os.getloadavg()
    print(f"\nfuzz: {total} inputs in {elapsed:.0f} s ({total / max(elapsed, 1e-9):.0f}/s), "
          f"by target {dict(counts)}, slowest input {slowest[0] * 1000:.1f} ms "
          f"({len(slowest[1])} bytes), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--hang", type=int, default=10, help="seconds that make an input a hang")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--corpus", default="", help="directory to keep the corpus in")
    parser.add_argument("--artifacts", default="/tmp", help="where a crashing input is written")
    parser.add_argument("--sessions", type=int, default=0,
                        help="instead: run the SMTP session fuzzer with this many examples")
    args = parser.parse_args()
    if args.sessions:
        env = {**os.environ, "RELAY_FUZZ_SESSIONS": str(args.sessions)}
        sys.exit(subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
             "-o", "addopts=", "--timeout=0", "tests/component/test_smtp_fuzz.py"],
            cwd=ROOT, env=env, check=False).returncode)
    RUNS[0] = args.runs
    argv = [sys.argv[0], f"-runs={args.runs}", f"-timeout={args.hang}",
            f"-max_len={args.max_len}", "-print_final_stats=1",
            f"-artifact_prefix={args.artifacts.rstrip('/')}/"]
    if args.corpus:
        Path(args.corpus).mkdir(parents=True, exist_ok=True)
        argv.append(args.corpus)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
