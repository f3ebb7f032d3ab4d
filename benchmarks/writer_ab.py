"""The writer alone, two trees alternated: CPU of the ``logd write`` process.

``yes "$L" | head -n 200000 | logd write --topic piped -q`` (L = 1000 bytes) and ``logd write
--topic one hello``, each tree's client in turn (the other tree first on odd rounds), each
run against a fresh ``logd serve`` of this tree on an empty data directory (default
durability).  The figure is the writer's own CPU (user + system, from ``wait4``):
on a loaded machine it moves much less than the wall time, and it leaves out ``yes``,
``head`` and the server.  Prints each round, then medians and OLD/NEW ratios.

    python benchmarks/writer_ab.py OLD_TREE [--rounds 6] [--lines 200000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import headline  # noqa: E402


def piped(tree: Path, host: str, lines: int, size: int) -> tuple[float, float, float]:
    """(wall, user, sys) seconds of the writer process of ``tree`` fed by yes | head."""
    yes = subprocess.Popen(["yes", "x" * size], stdout=subprocess.PIPE)
    head = subprocess.Popen(["head", "-n", str(lines)], stdin=yes.stdout, stdout=subprocess.PIPE)
    assert yes.stdout is not None and head.stdout is not None
    yes.stdout.close()
    t0 = time.perf_counter()
    writer = subprocess.Popen([sys.executable, "-c", headline.CLI, "write", "--host", host, "--topic", "piped", "-q"],
                              stdin=head.stdout, env=headline._env(tree), cwd=tree)
    head.stdout.close()
    _, status, usage = os.wait4(writer.pid, 0)
    wall = time.perf_counter() - t0
    head.wait()
    yes.wait()
    if status != 0:
        raise RuntimeError(f"logd write of {tree} failed ({status})")
    return wall, usage.ru_utime, usage.ru_stime


def one_line(tree: Path, host: str) -> tuple[float, float]:
    """(wall, CPU) seconds of ``logd write --topic one hello``."""
    t0 = time.perf_counter()
    writer = subprocess.Popen([sys.executable, "-c", headline.CLI, "write", "--host", host, "--topic", "one", "hello"],
                              env=headline._env(tree), cwd=tree, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(writer.pid, 0)
    if status != 0:
        raise RuntimeError(f"logd write of {tree} failed ({status})")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path, help="another checkout, whose client runs against this tree's server")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=1000)
    args = ap.parse_args()
    trees = {"OLD": args.old.resolve(), "NEW": REPO}
    got: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": [], "user": [], "sys": [], "one wall": [],
                                                  "one cpu": []} for n in trees}
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    headline.WORK = Path(headline.tempfile.mkdtemp(prefix="logd-writer-ab-"))
    try:
        for tree in trees.values():  # warm-up: compiled modules cached
            with headline.server(REPO) as (host, _):
                piped(tree, host, min(args.lines, 20_000), args.size)
        for r in range(args.rounds):
            order = list(trees.items())
            if r % 2:  # the other tree first on odd rounds: no order bias
                order.reverse()
            for name, tree in order:
                with headline.server(REPO) as (host, _):  # a fresh server on an empty data directory
                    wall, user, sys_ = piped(tree, host, args.lines, args.size)
                    g = got[name]
                    g["wall"].append(wall)
                    g["user"].append(user)
                    g["sys"].append(sys_)
                    g["cpu"].append(user + sys_)
                    for _ in range(3):
                        ow, oc = one_line(tree, host)
                        g["one wall"].append(ow)
                        g["one cpu"].append(oc)
                print(f"round {r + 1} {name}: writer CPU {user:.2f} user + {sys_:.2f} sys, wall {wall:.2f} s; "
                      f"one line CPU {statistics.median(g['one cpu'][-3:]):.3f} s", flush=True)
    finally:
        headline.shutil.rmtree(headline.WORK, ignore_errors=True)
    med = {n: {k: statistics.median(v) for k, v in g.items()} for n, g in got.items()}
    for name, m in med.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    o, n = med["OLD"], med["NEW"]
    print(f"  OLD/NEW: writer CPU {o['cpu'] / n['cpu']:.2f}x (user {o['user'] / n['user']:.2f}x, sys "
          f"{o['sys'] / n['sys']:.2f}x), piped wall {o['wall'] / n['wall']:.2f}x; one line CPU "
          f"{o['one cpu'] / n['one cpu']:.2f}x, wall {o['one wall'] / n['one wall']:.2f}x; "
          f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
