"""Same-run A/B of two source trees: server CPU per request (µs, utime + stime from /proc).

    python benchmarks/ab_perrequest.py OLD_TREE [--new NEW_TREE] [--rounds 4] [--duration 2]
        [--conns 16] [--in-flight 1] [--read-batches 0] [--message-size 31]

Each round starts a fresh ``logd serve --fsync never`` on tmpfs from each tree in turn
(alternating which goes first), runs the bench engine's write phase, then its read phase
(``--in-flight 1``: one request per connection waiting for its reply, a READ of one
batch, Go log-cli's pattern), and prints per tree the medians of server µs per BATCH and
per READ and of MiB/s, and the ratios new/old.  OLD_TREE is a checkout of the commit to
compare against (``git archive REV | tar -x -C /tmp/old``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ab_trees import TMPFS, server  # noqa: E402

from logd_trio.tools.bench import BenchConfig, run_bench  # noqa: E402


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    with server(tree, TMPFS / "pr", "--fsync", "never") as (port, proc, _):
        common = {"host": f"127.0.0.1:{port}", "conns": args.conns, "duration": args.duration,
                  "message_size": args.message_size, "in_flight": args.in_flight, "read_batches": args.read_batches}
        c0 = cpu_seconds(proc.pid)
        w = trio.run(run_bench, BenchConfig(**common, read=False)).write
        c1 = cpu_seconds(proc.pid)
        r = trio.run(run_bench, BenchConfig(**common, write=False)).read
        c2 = cpu_seconds(proc.pid)
    assert w is not None and r is not None
    return {"BATCH µs/request": (c1 - c0) / w.requests * 1e6, "READ µs/request": (c2 - c1) / r.requests * 1e6,
            "write MiB/s": w.mib_per_s, "read MiB/s": r.mib_per_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("--new", type=Path, default=REPO)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--in-flight", type=int, default=1)
    ap.add_argument("--read-batches", type=int, default=0)
    ap.add_argument("--message-size", type=int, default=31)
    args = ap.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    results: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for r in range(args.rounds):
        for name in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
            for case, value in one(trees[name], args).items():
                results[name].setdefault(case, []).append(value)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"\n| case | old ({trees['old'].name}) | new ({trees['new'].name}) | new/old |\n|---|---|---|---|")
    for case in results["old"]:
        o, n = statistics.median(results["old"][case]), statistics.median(results["new"][case])
        print(f"| {case} | {o:.1f} | {n:.1f} | {n / o:.2f} |")


if __name__ == "__main__":
    main()
