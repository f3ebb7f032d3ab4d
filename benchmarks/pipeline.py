"""Pipeline benchmark: N lines of L bytes piped into one writer over one connection.

``write_lines`` is the bench engine's own line writer: it reads the file line
by line, frames ~64 KB batches (``MSG <len>\\r\\n<line>\\r\\n``, newline
stripped) as a client library does, and sends them pipelined
(:func:`logd_trio.tools.bench.write_frames`, 32 in flight).  The time runs from
opening the file to the last acknowledgement, so batching on the client side
is included.  ``run_logd_write`` times ``logd write`` (the client CLI
command) when it exists.

Standalone::

    python benchmarks/pipeline.py --host 127.0.0.1:1774 [--lines 200000 --size 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from logd_trio.core.requests import encode_batch  # noqa: E402
from logd_trio.tools.bench import PhaseResult, write_frames  # noqa: E402

MAX_REQUEST = 65536


def make_lines(path: Path, n: int, size: int) -> None:
    """``n`` printable lines of ``size`` bytes (plus newline), each different."""
    if path.exists() and path.stat().st_size == n * (size + 1):
        return
    filler = (b"lorem ipsum dolor sit amet consectetur adipiscing elit " * (size // 50 + 2))
    with open(path, "wb") as f:
        for i in range(n):
            head = b"%08d " % i
            f.write(head + filler[: size - len(head)] + b"\n")


def frames_from_lines(path: Path, topic: str) -> Iterator[tuple[bytes, int]]:
    """Batches of the file's lines, each request at most 64 KiB."""
    room = MAX_REQUEST - 64 - len(topic)
    parts: list[bytes] = []
    size = count = 0
    with open(path, "rb", buffering=1 << 20) as f:
        for line in f:
            m = line.rstrip(b"\n")
            rec = b"MSG %d\r\n%s\r\n" % (len(m), m)
            if size + len(rec) > room and count:
                yield encode_batch(topic, b"".join(parts), count), count
                parts, size, count = [], 0, 0
            parts.append(rec)
            size += len(rec)
            count += 1
    if count:
        yield encode_batch(topic, b"".join(parts), count), count


async def write_lines(host: str, topic: str, path: Path, window: int = 32) -> dict[str, Any]:
    addr, _, port = host.rpartition(":")
    stream = await trio.open_tcp_stream(addr, int(port))
    phase = PhaseResult("write")
    with stream.socket as sock:
        t0 = time.perf_counter()
        await write_frames(sock, frames_from_lines(path, topic), window, phase)
        phase.seconds = time.perf_counter() - t0
    return phase.as_dict()


def has_logd_write() -> bool:
    try:
        r = subprocess.run([sys.executable, "-c", "import sys; from cli.main import main; main()", "write", "--help"],
                           cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def run_logd_write(host: str, topic: str, path: Path) -> float:
    """Seconds for ``logd write --host H --topic T < path``."""
    with open(path, "rb") as f:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from cli.main import main; main()", "write",
                        "--host", host, "--topic", topic], stdin=f, stdout=subprocess.DEVNULL, check=True,
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1:1774")
    ap.add_argument("--topic", default="pipeline")
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--file", type=Path, default=Path("/tmp/logd-bench-lines.txt"))
    ap.add_argument("--window", type=int, default=32, help="batches in flight")
    args = ap.parse_args()
    make_lines(args.file, args.lines, args.size)
    print(json.dumps(trio.run(write_lines, args.host, args.topic, args.file, args.window)))


if __name__ == "__main__":
    main()
