"""Same-run A/B of ``logd serve --workers 1`` against ``--workers N``: one-in-flight clients.

    python benchmarks/workers.py [--workers 2] [--rounds 4] [--duration 2] [--conns 16]
        [--in-flight 1] [--read-batches 1] [--tree TREE]

Each round starts a fresh ``logd serve --fsync never`` on tmpfs with ``--workers 1``
and with ``--workers N`` in turn (alternating which goes first), runs the bench
engine's write phase, then its read phase (``--in-flight 1``: each connection sends
one request and waits for its reply; a READ asks for one 64 KB batch, Go log-cli's
pattern), and prints the medians of requests/s per phase, of the server's CPU per
request (owner and workers: utime + stime from /proc), of the owner's share and of
the client's (this process: the bench engine shares the cores), with the ratios
N/1.  The data directory is the same for both and tmpfs, so the disk is not measured.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ab_trees import TMPFS, server  # noqa: E402

from logd_trio.tools.bench import BenchConfig, PhaseResult, run_bench  # noqa: E402


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _phase(pids: list[int], cfg: BenchConfig, write: bool) -> tuple[PhaseResult, list[float], float]:
    before, c0 = [_cpu(p) for p in pids], _self_cpu()
    res = trio.run(run_bench, cfg)
    after, c1 = [_cpu(p) for p in pids], _self_cpu()
    phase = res.write if write else res.read
    assert phase is not None and phase.requests > 0
    return phase, [(a - b) / phase.requests * 1e6 for a, b in zip(after, before, strict=True)], \
        (c1 - c0) / phase.requests * 1e6


def one(tree: Path, workers: int, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    with server(tree, TMPFS / "wk", "--fsync", "never", "--workers", str(workers)) as (port, proc, _):
        deadline = time.monotonic() + 30
        while len(pids := [proc.pid, *_children(proc.pid)]) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(pids) == workers, f"expected {workers} processes, found {pids}"
        time.sleep(1.0 if workers > 1 else 0.0)  # the workers bind, then say they are ready
        common = {"host": f"127.0.0.1:{port}", "conns": args.conns, "duration": args.duration,
                  "message_size": 31, "in_flight": args.in_flight, "read_batches": args.read_batches}
        for kind, write in (("BATCH", True), ("READ", False)):
            cfg = BenchConfig(**common, read=not write, write=write)
            phase, per_pid, client = _phase(pids, cfg, write)
            out[f"{kind} req/s"] = phase.requests / phase.seconds
            out[f"{kind} server µs/req"] = sum(per_pid)
            out[f"{kind} owner µs/req"] = per_pid[0]
            out[f"{kind} client µs/req"] = client
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--in-flight", type=int, default=1)
    ap.add_argument("--read-batches", type=int, default=1)
    ap.add_argument("--tree", type=Path, default=REPO)
    args = ap.parse_args()
    tree = args.tree.resolve()
    counts = (1, args.workers)
    results: dict[int, dict[str, list[float]]] = {n: {} for n in counts}
    for r in range(args.rounds):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            load = os.getloadavg()[0]
            got = one(tree, n, args)
            for case, value in got.items():
                results[n].setdefault(case, []).append(value)
            print(f"round {r + 1}/{args.rounds} --workers {n}: load {load:.2f}, BATCH {got['BATCH req/s']:.0f}/s, "
                  f"READ {got['READ req/s']:.0f}/s", flush=True)
    n = args.workers
    print(f"\n{args.conns} conns, {args.in_flight} in flight, medians of {args.rounds} rounds of {args.duration:g}s")
    print(f"| case | --workers 1 | --workers {n} | {n}/1 |\n|---|---|---|---|")
    for case in results[1]:
        a, b = statistics.median(results[1][case]), statistics.median(results[n][case])
        print(f"| {case} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
