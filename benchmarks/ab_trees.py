"""Same-run A/B of two source trees: servers from each, the same client load, alternated.

    python benchmarks/ab_trees.py OLD_TREE [--new NEW_TREE] [--rounds 3] [--duration 2]

OLD_TREE is a checkout of the commit to compare against (``git worktree add /tmp/old
<rev>``); NEW_TREE defaults to this repository.  Each round starts a fresh
``logd serve`` from each tree in turn (A then B, then B then A on the next round,
so drift on this shared machine hits both), runs the cases below from this
process (the bench engine of this tree: the client is the constant), and prints
the median of each case per tree and the ratio new/old.

Cases: pipelined 64 KB batches on tmpfs with fsync never (1 connection x 1000 B
messages, 16 connections x 31 B, the 16-connection read phase), one connection
of 1000 B lines with the default durability (fsync always, on disk), the
server's peak RSS under 16 connections, and the time from process start to
listening over 200 MB of stored batches.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import pipeline  # noqa: E402
from procs import stop_server  # noqa: E402
from run import SERVER_CMD, _rss_mib, free_port, make_topic_files, wait_listening  # noqa: E402

from logd_trio.tools.bench import BenchConfig, run_bench  # noqa: E402

TMPFS = Path("/dev/shm/logd-ab")
DISK = Path("/tmp/logd-ab")


@contextlib.contextmanager
def server(
    tree: Path, workdir: Path, *args: str, fresh: bool = True
) -> Iterator[tuple[int, subprocess.Popen[bytes], float]]:
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    port = free_port()
    cmd = [sys.executable, "-c", SERVER_CMD, "serve", "--host", f"127.0.0.1:{port}", "--workdir", str(workdir),
           "--idle-timeout", "0", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = wait_listening(port, proc) - t0
        yield port, proc, started
    finally:
        stop_server(proc)


def bench(port: int, duration: float, conns: int, msize: int, read: bool) -> tuple[float, float | None]:
    cfg = BenchConfig(host=f"127.0.0.1:{port}", conns=conns, topics=1, duration=duration, message_size=msize,
                      read=read)
    res = trio.run(run_bench, cfg)
    assert res.write is not None
    return res.write.mib_per_s, (res.read.mib_per_s if res.read is not None else None)


def one_round(tree: Path, duration: float, lines: Path, restart_dir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    with server(tree, TMPFS / "d", "--fsync", "never") as (port, _, _):
        out["write 1 conn 1000 B (MiB/s)"] = bench(port, duration, 1, 1000, False)[0]
    with server(tree, TMPFS / "d", "--fsync", "never") as (port, proc, _):
        peak = 0.0
        w, r = bench(port, duration, 16, 31, True)
        peak = max(peak, _rss_mib(proc.pid))
        out["write 16 conns 31 B (MiB/s)"] = w
        out["read 16 conns (MiB/s)"] = r or 0.0
        out["RSS after 16 conns (MiB)"] = peak
    with server(tree, DISK / "d") as (port, _, _):
        res = trio.run(pipeline.write_lines, f"127.0.0.1:{port}", "ab", lines, 32)
        out["lines 1000 B, fsync always (msg/s)"] = res["messages_per_s"]
    with server(tree, restart_dir, fresh=False) as (_, _, started):
        out["start to listening, 200 MB (ms)"] = started * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("--new", type=Path, default=REPO)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    args = ap.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    lines = DISK / "lines.txt"
    DISK.mkdir(parents=True, exist_ok=True)
    pipeline.make_lines(lines, 100_000, 1000)
    restart_dir = DISK / "restart"
    shutil.rmtree(restart_dir, ignore_errors=True)
    make_topic_files(restart_dir / "t", 200 * 2**20)
    results: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    try:
        for r in range(args.rounds):
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            for name in order:
                for case, value in one_round(trees[name], args.duration, lines, restart_dir).items():
                    results[name].setdefault(case, []).append(value)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        shutil.rmtree(TMPFS, ignore_errors=True)
        shutil.rmtree(DISK, ignore_errors=True)
    print(f"\n| case | old ({trees['old'].name}) | new ({trees['new'].name}) | new/old |")
    print("|---|---|---|---|")
    for case, old_values in results["old"].items():
        o = statistics.median(old_values)
        n = statistics.median(results["new"][case])
        print(f"| {case} | {o:.1f} | {n:.1f} | {n / o:.2f} |")


if __name__ == "__main__":
    main()
