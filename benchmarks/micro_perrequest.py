"""Micro-costs of the per-request steps changed in wave 2 part 2, in one process (µs per call).

    python benchmarks/micro_perrequest.py [--n 5000]

* a BATCH of one 31 B message appended through the topic task (queued, the task wakes,
  writes and acknowledges, the caller wakes) against appended at once (``Topic.append_now``),
  tmpfs, fsync never (a small batch: the hop, not the page-cache copy);
* the exact message walk of that batch (``count_messages``) and the CRC-32 of it.
Rounds alternate the two ways; the minimum of each is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import timeit
from pathlib import Path

import trio
import trio.testing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from logd_trio.core.framing import build_body, build_frame, count_messages, crc32  # noqa: E402
from logd_trio.server.config import ServerConfig  # noqa: E402
from logd_trio.server.topic import Topic  # noqa: E402

ROOT = Path("/dev/shm/logd-micro")


def batch() -> bytes:
    body = build_body([os.urandom(31) for _ in range(65536 // 41)])
    return build_frame("t", body, 65536 // 41)


async def appends(topic: Topic, n: int) -> tuple[float, float]:
    frame = build_frame("t", build_body([os.urandom(31)]), 1)
    best = {"queued": float("inf"), "direct": float("inf")}
    async with trio.open_nursery() as nursery:
        await nursery.start(topic.run)
        for r in range(6):
            for way in (["queued", "direct"] if r % 2 == 0 else ["direct", "queued"]):
                await trio.testing.wait_all_tasks_blocked()
                t0 = time.perf_counter()
                for _ in range(n):
                    item = topic.append_now(frame, 1) if way == "direct" else None
                    if item is None:
                        item = topic.try_append(frame, 1)
                        assert item is not None
                    await item.done.wait()
                best[way] = min(best[way], (time.perf_counter() - t0) / n * 1e6)
        topic.close_input()
    return best["queued"], best["direct"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    args = ap.parse_args()
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    topic = Topic.open(ROOT, "t", ServerConfig(workdir=ROOT, fsync="never", partition_size=1 << 30))
    try:
        queued, direct = trio.run(appends, topic, args.n)
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
    print(f"append through the topic task: {queued:.1f} µs; at once: {direct:.1f} µs ({direct / queued:.2f}x)")
    frame = batch()
    body = frame[frame.index(b"\n") + 1:]
    walk = min(timeit.repeat(lambda: count_messages(body), number=500, repeat=9)) / 500 * 1e6
    crc = min(timeit.repeat(lambda: crc32(body), number=500, repeat=9)) / 500 * 1e6
    print(f"message walk of 64 KB of 31 B messages: {walk:.1f} µs; CRC-32: {crc:.1f} µs")


if __name__ == "__main__":
    main()
