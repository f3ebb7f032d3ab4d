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
A round starts its load only once every worker logged that it listens, and reports how
many of the connections each process served (counted in /proc in the middle of each
phase: the kernel spreads them by a hash, so the split changes from round to round).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ab_trees import TMPFS  # noqa: E402
from run import SERVER_CMD, free_port, wait_listening  # noqa: E402

from logd_trio.tools.bench import BenchConfig, PhaseResult, run_bench  # noqa: E402


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def _server(tree: Path, workdir: Path, workers: int) -> Iterator[tuple[int, list[int]]]:
    """``logd serve --workers N`` whose log goes to a file; yields its port and pids (the owner's
    first) once every worker said it listens."""
    shutil.rmtree(workdir, ignore_errors=True)
    port, logpath = free_port(), workdir.with_suffix(".log")
    cmd = [sys.executable, "-c", SERVER_CMD, "serve", "--host", f"127.0.0.1:{port}", "--workdir", str(workdir),
           "--idle-timeout", "0", "--fsync", "never", "--workers", str(workers)]
    with open(logpath, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                                stdout=subprocess.DEVNULL, stderr=logf)
    try:
        wait_listening(port, proc)
        deadline = time.monotonic() + 30
        while len(ready := re.findall(rb"worker \d+ \(pid (\d+)\) listening", logpath.read_bytes())) < workers - 1:
            assert time.monotonic() < deadline and proc.poll() is None, "the workers did not start"
            time.sleep(0.05)
        yield port, [proc.pid, *(int(pid) for pid in ready)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _connections(pids: list[int], port: int) -> list[int]:
    """How many TCP connections to ``port`` each process holds (its fds matched to /proc/net/tcp*)."""
    ours: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # local port, ESTABLISHED
                    ours.add(fields[9])
    counts = []
    for pid in pids:
        n = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                n += link.startswith("socket:[") and link[8:-1] in ours
        counts.append(n)
    return counts


def _phase(pids: list[int], cfg: BenchConfig, write: bool,
           split: list[list[int]]) -> tuple[PhaseResult, list[float], float]:
    port = int(cfg.host.rsplit(":", 1)[1])
    timer = threading.Timer(cfg.duration / 2, lambda: split.append(_connections(pids, port)))
    before, c0 = [_cpu(p) for p in pids], _self_cpu()
    timer.start()
    try:
        res = trio.run(run_bench, cfg)
    finally:
        timer.cancel()
    after, c1 = [_cpu(p) for p in pids], _self_cpu()
    phase = res.write if write else res.read
    assert phase is not None and phase.requests > 0
    return phase, [(a - b) / phase.requests * 1e6 for a, b in zip(after, before, strict=True)], \
        (c1 - c0) / phase.requests * 1e6


def one(tree: Path, workers: int, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, list[int]]]:
    out: dict[str, float] = {}
    splits: dict[str, list[int]] = {}
    with _server(tree, TMPFS / "wk", workers) as (port, pids):
        common = {"host": f"127.0.0.1:{port}", "conns": args.conns, "duration": args.duration,
                  "message_size": 31, "in_flight": args.in_flight, "read_batches": args.read_batches}
        for kind, write in (("BATCH", True), ("READ", False)):
            cfg = BenchConfig(**common, read=not write, write=write)
            split: list[list[int]] = []
            phase, per_pid, client = _phase(pids, cfg, write, split)
            splits[kind] = split[0] if split else []
            out[f"{kind} req/s"] = phase.requests / phase.seconds
            out[f"{kind} server µs/req"] = sum(per_pid)
            out[f"{kind} owner µs/req"] = per_pid[0]
            out[f"{kind} client µs/req"] = client
    return out, splits


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
            got, splits = one(tree, n, args)
            for case, value in got.items():
                results[n].setdefault(case, []).append(value)
            shown = ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in splits.items())
            print(f"round {r + 1}/{args.rounds} --workers {n}: load {load:.2f}, BATCH {got['BATCH req/s']:.0f}/s, "
                  f"READ {got['READ req/s']:.0f}/s; connections owner/workers: {shown}", flush=True)
    n = args.workers
    print(f"\n{args.conns} conns, {args.in_flight} in flight, medians of {args.rounds} rounds of {args.duration:g}s")
    print(f"| case | --workers 1 | --workers {n} | {n}/1 |\n|---|---|---|---|")
    for case in results[1]:
        a, b = statistics.median(results[1][case]), statistics.median(results[n][case])
        print(f"| {case} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
