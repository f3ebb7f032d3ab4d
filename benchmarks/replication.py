"""What replication costs: write throughput with followers and with ``--acks all``, and
how far behind a follower is (time from the leader's OK to the batch being readable on it).

Run from the repository root (about two minutes with the defaults)::

    python benchmarks/replication.py
    python benchmarks/replication.py --duration 3 --rounds 3 --json out.json

Every server is a fresh ``logd serve`` process on 127.0.0.1 with its data in /tmp and the
default durability (fsync always).  The set-ups, measured in alternating rounds so that
a noisy machine hurts them alike:

``alone``        a leader without followers (the baseline);
``follower``     the same leader with one follower copying it (``--acks leader``);
``acks-all``     leader and one follower, ``--acks all --min-insync 2``;
``followers-2``  the leader with two followers (``--acks leader``): the comparison for
``acks-all-2``   leader and two followers, ``--acks all --min-insync 2`` (an OK waits for
                 the faster follower's fsync) and
``acks-all-3``   the same with ``--min-insync 3`` (an OK waits for both).

Each runs ``logd bench --only-write`` with 64 KB batches of 31-byte messages, 4
connections, one request in flight per connection (``--in-flight 1``) and pipelined
(``--in-flight 32``).  Follower lag: one 100-byte batch at a time on the leader, then a
READ on the follower repeated until the batch is there (capped at the leader's high
watermark); the median and p99, idle and under the pipelined bench load on another
topic, with one follower (``--acks leader``) and with two (``--acks all --min-insync 2``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import stop_server
from run import REPO, logd_server

# set-up: (followers, --min-insync with --acks all; 0: --acks leader)
SETUPS: dict[str, tuple[int, int]] = {"alone": (0, 0), "follower": (1, 0), "acks-all": (1, 2),
                                      "followers-2": (2, 0), "acks-all-2": (2, 2), "acks-all-3": (2, 3)}
LAG_SETUPS = ("follower", "acks-all-2")


@contextlib.contextmanager
def cluster(root: Path, setup: str) -> Iterator[tuple[int, int | None]]:
    """The leader's port and its first follower's (None when ``alone``)."""
    followers, insync = SETUPS[setup]
    acks = ("--acks", "all", "--min-insync", str(insync)) if insync else ()
    with contextlib.ExitStack() as stack:
        leader, _ = stack.enter_context(logd_server(root / "a", "--node-id", "a", *acks))
        ports = [stack.enter_context(logd_server(root / n, "--node-id", n, "--replicate-from",
                                                 f"127.0.0.1:{leader}"))[0] for n in "bc"[:followers]]
        if insync:
            _wait_in_sync(leader)
        yield leader, ports[0] if ports else None


def _request(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        reply += chunk
    return reply


def _batch(topic: str, body: bytes) -> bytes:
    msg = b"MSG %d\r\n%s\r\n" % (len(body), body)
    return b"BATCH %d %s %d 1\r\n%s" % (len(msg), topic.encode(), zlib.crc32(msg), msg)


def _wait_in_sync(leader: int, timeout: float = 30.0) -> None:
    """Until the follower joined the in-sync set: a write is acknowledged."""
    end = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", leader), timeout=10) as s:
        while time.monotonic() < end:
            if _request(s, _batch("warmup", b"x")).startswith(b"OK "):
                return
            time.sleep(0.05)
    raise RuntimeError("the follower did not get in sync")


def _bench_cmd(port: int, in_flight: int, duration: float) -> list[str]:
    return [sys.executable, "-c", "import sys; from cli.main import main; sys.argv[0] = 'logd'; main()", "bench",
            "--host", f"127.0.0.1:{port}", "--only-write", "--conns", "4", "--in-flight", str(in_flight),
            "--duration", str(duration), "--json", "--keep"]


def bench(port: int, in_flight: int, duration: float) -> float:
    """Batches per second of ``logd bench --only-write``."""
    out = subprocess.run(_bench_cmd(port, in_flight, duration), cwd=REPO, capture_output=True, check=True,
                         timeout=duration + 60)
    result = json.loads(out.stdout)
    return float(result["write"]["batches_per_s"])


@contextlib.contextmanager
def bench_load(port: int, duration: float) -> Iterator[None]:
    """The pipelined bench running against ``port`` meanwhile (stopped at the end, bounded)."""
    proc = subprocess.Popen(_bench_cmd(port, 32, duration), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # the load is on
        yield
    finally:
        stop_server(proc)


def follower_lag(leader: int, follower: int, n: int) -> list[float]:
    """Seconds from each OK on the leader to the batch being readable on the follower."""
    lags: list[float] = []
    with socket.create_connection(("127.0.0.1", leader), timeout=10) as w, \
            socket.create_connection(("127.0.0.1", follower), timeout=10) as r:
        for i in range(n):
            frame = _batch("lag", b"%04d" % i + b"x" * 96)
            reply = _request(w, frame)
            acked = time.monotonic()
            offset = int(reply.split()[1])
            while True:
                r.sendall(b"READ lag %d 1\r\n" % offset)
                got = _read_reply(r, len(frame))
                if got == frame:
                    break
                time.sleep(0.0005)
            lags.append(time.monotonic() - acked)
    return lags


def _read_reply(sock: socket.socket, frame_len: int) -> bytes | None:
    """A READ's one frame (``frame_len`` bytes after an ``OK`` line), or None for an ``ERR``."""
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        buf += chunk
    line, rest = buf.split(b"\r\n", 1)
    if not line.startswith(b"OK "):
        return None
    while len(rest) < frame_len:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        rest += chunk
    return rest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per bench phase")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per set-up")
    ap.add_argument("--lag-samples", type=int, default=200)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    rates: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="logd-repl-bench-", dir="/tmp") as tmp:
        for rnd in range(args.rounds):
            for setup in SETUPS if rnd % 2 == 0 else reversed(SETUPS):
                with cluster(Path(tmp) / f"{setup}-{rnd}", setup) as (leader, _):
                    for in_flight in (1, 32):
                        rate = bench(leader, in_flight, args.duration)
                        rates.setdefault((setup, in_flight), []).append(rate)
                        print(f"round {rnd + 1} {setup:9s} in-flight {in_flight:2d}: {rate:8.1f} batches/s",
                              file=sys.stderr)
        lags: dict[str, list[float]] = {}
        for setup in LAG_SETUPS:
            with cluster(Path(tmp) / f"lag-{setup}", setup) as (leader, follower):
                assert follower is not None
                lags[f"{setup}/idle"] = sorted(follower_lag(leader, follower, args.lag_samples))
                with bench_load(leader, 600):
                    lags[f"{setup}/load"] = sorted(follower_lag(leader, follower, args.lag_samples))
    results: dict[str, object] = {}
    print(f"{'set-up':10s} {'in-flight':>9s} {'batches/s':>10s} {'vs alone':>9s}")
    for in_flight in (1, 32):
        base = statistics.median(rates[("alone", in_flight)])
        for setup in SETUPS:
            rate = statistics.median(rates[(setup, in_flight)])
            print(f"{setup:11s} {in_flight:9d} {rate:10.1f} {rate / base:8.2f}x")
            results[f"{setup}/{in_flight}"] = {"batches_per_s": rate, "ratio": rate / base}
        two, all2 = (statistics.median(rates[(s, in_flight)]) for s in ("followers-2", "acks-all-2"))
        print(f"acks-all-2 vs followers-2 (--acks all vs --acks leader, two followers): {all2 / two:.2f}x")
        results[f"acks-all-2-vs-leader/{in_flight}"] = all2 / two
    for key, got in lags.items():
        median, p99 = statistics.median(got), got[max(int(len(got) * 0.99) - 1, 0)]
        print(f"follower lag {key} (OK on the leader -> readable on the follower): median {median * 1000:.2f} ms, "
              f"p99 {p99 * 1000:.2f} ms over {len(got)} batches")
        results[f"lag_ms/{key}"] = {"median": median * 1000, "p99": p99 * 1000}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
