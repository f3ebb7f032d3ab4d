"""The piped headline and the one-line start-up, this tree against another, same run.

``yes "$L" | head -n 200000 | logd write --topic piped`` (L = 1000 bytes) against a fresh
``logd serve`` with the default durability (fsync always, data on disk in /tmp), timed as a
whole process; then ``logd write --topic one hello`` (start-up: one line, one batch, one
ack).  With ``--old TREE`` each round runs the other tree (its own server and client) and
this one alternately; every round also runs the ceiling: the bench engine's pipelined line
writer (:func:`pipeline.write_lines`, 128 batches in flight like ``logd write``) against this
tree's server, same lines, same fsync.  After each piped run the topic is read back: it must
hold exactly the lines written, each one intact.  Prints each run, then medians and ratios.

    python benchmarks/headline.py --old /tmp/old-tree [--rounds 3] [--lines 200000]
    python benchmarks/run.py headline          # this tree only, with the ceiling
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import pipeline  # noqa: E402
from procs import stop_server  # noqa: E402

from logd_trio.client.client import open_client  # noqa: E402
from logd_trio.core.framing import msg_header  # noqa: E402

WORK = Path(tempfile.gettempdir())  # run() makes a directory of its own (concurrent runs)
CLI = "import sys; from cli.main import main; sys.argv[0] = 'logd'; main()"


def _env(tree: Path, **extra: str) -> dict[str, str]:
    """Each tree's modules compiled once, into a cache of its own, as an installed package's are
    (with PYTHONDONTWRITEBYTECODE set every start would compile them again); the trees stay clean."""
    return dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="",
                PYTHONPYCACHEPREFIX=str(WORK / "pycache" / tree.name), **extra)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def server(tree: Path) -> Iterator[tuple[str, int]]:
    """A fresh ``logd serve`` of ``tree`` (default durability, data in /tmp); (address, pid)."""
    data = WORK / "data"
    shutil.rmtree(data, ignore_errors=True)
    # Port 0, then the port its log names: a port picked here could be taken by another
    # process before the server binds it (and the connect check would find that one).
    log = (WORK / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--host", "127.0.0.1:0", "--workdir", str(data),
                             "--idle-timeout", "0"], cwd=tree, env=_env(tree), stdout=subprocess.DEVNULL, stderr=log)
    try:
        end = time.monotonic() + 60
        while not (found := re.search(r"listening on 127\.0\.0\.1:(\d+)", (WORK / "server.log").read_text())):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the server of {tree} did not start")
            time.sleep(0.005)
        port = int(found.group(1))
        yield f"127.0.0.1:{port}", proc.pid
    except BaseException:
        log.flush()
        print("the server's log, last lines:", *(WORK / "server.log").read_text().splitlines()[-15:], sep="\n  ")
        raise
    finally:
        stop_server(proc)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def piped(tree: Path, lines: int, size: int) -> dict[str, float]:
    """One piped headline run of ``tree``: wall seconds, CPU of the pipeline (yes, head and
    the writer) and of the server."""
    script = f'yes "$L" | head -n {lines} | "$PY" -c "$CLI" write --host "$HOST" --topic piped'
    with server(tree) as (host, pid):
        env = _env(tree, L="x" * size, HOST=host, PY=sys.executable, CLI=CLI)
        s0, c0, t0 = _cpu(pid), _children_cpu(), time.perf_counter()
        subprocess.run(["bash", "-c", script], env=env, cwd=tree, check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        client, srv = _children_cpu() - c0, _cpu(pid) - s0
        stored = trio.run(stored_messages, host, "piped", b"x" * size)
        assert stored == lines, f"{stored} messages stored, {lines} written"
    return {"s": wall, "pipeline cpu": client, "server cpu": srv}


async def stored_messages(host: str, topic: str, line: bytes) -> int:
    """How many messages ``topic`` holds, read back from its first offset to its head (TOPICS);
    AssertionError unless every one of them is ``line``."""
    framed = msg_header(len(line)) + line + b"\r\n"
    async with open_client(host) as client:
        first, head = (await client.topics())[topic]
        offset, count = first, 0
        while offset < head:
            reply = await client.read(topic, offset, 20_000)
            for batch in reply.batches:
                assert batch.body == framed * batch.count, f"batch at {batch.offset}: not {batch.count} x the line"
                count += batch.count
            offset = reply.next_offset
        assert offset == head, f"read up to {offset}, the head is {head}"
    return count


def one_line(tree: Path, runs: int = 5) -> float:
    """Median seconds of ``logd write --topic one hello`` (a server running; one run first
    that is not counted)."""
    with server(tree) as (host, _):
        times = []
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", CLI, "write", "--host", host, "--topic", "one", "hello"],
                           cwd=tree, env=_env(tree), check=True, timeout=60,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def ceiling(lines_file: Path) -> float:
    """The bench engine's pipelined line writer against this tree's server: seconds."""
    with server(REPO) as (host, _):
        res: dict[str, Any] = trio.run(pipeline.write_lines, host, "piped", lines_file, 128)
    return float(res["seconds"])


def run(old: Path | None, rounds: int, lines: int, size: int) -> dict[str, Any]:
    trees = {"OLD": old, "NEW": REPO} if old is not None else {"NEW": REPO}
    global WORK
    WORK = Path(tempfile.mkdtemp(prefix="logd-headline-"))
    lines_file = WORK / "lines.txt"
    pipeline.make_lines(lines_file, lines, size)
    got: dict[str, list[Any]] = {name: [] for name in [*trees, "ceiling"]}
    starts: dict[str, list[float]] = {name: [] for name in trees}
    try:
        for tree in trees.values():  # a warm-up, not counted: compiled modules cached, disk and caches warm
            assert tree is not None
            piped(tree, min(lines, 20_000), size)
        for r in range(rounds):
            for name, tree in trees.items():
                assert tree is not None
                res = piped(tree, lines, size)
                got[name].append(res)
                starts[name].append(one_line(tree))
                print(f"round {r + 1} {name}: {res['s']:.2f} s ({lines / res['s']:,.0f} msg/s), CPU: pipeline "
                      f"{res['pipeline cpu']:.2f} s, server {res['server cpu']:.2f} s; one line "
                      f"{starts[name][-1]:.3f} s", flush=True)
            got["ceiling"].append(ceiling(lines_file))
            print(f"round {r + 1} ceiling (bench line writer, 128 in flight): {got['ceiling'][-1]:.2f} s "
                  f"({lines / got['ceiling'][-1]:,.0f} msg/s)", flush=True)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    summary: dict[str, Any] = {}
    for name in trees:
        summary[name] = {key: statistics.median(r[key] for r in got[name]) for key in got[name][0]}
        summary[name]["one line s"] = statistics.median(starts[name])
        summary[name]["msg/s"] = lines / summary[name]["s"]
    summary["ceiling"] = {"s": statistics.median(got["ceiling"]), "msg/s": lines / statistics.median(got["ceiling"])}
    print("medians:")
    for name, values in summary.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:,.3f}" if v < 100 else f"{k} {v:,.0f}" for k, v in values.items()))
    new = summary["NEW"]
    print(f"  NEW rate / ceiling rate: {new['msg/s'] / summary['ceiling']['msg/s']:.2f}")
    if "OLD" in summary:
        o = summary["OLD"]
        print(f"  OLD time / NEW time: piped {o['s'] / new['s']:.2f}x, "
              f"one line {o['one line s'] / new['one line s']:.2f}x;"
              f" pipeline CPU {o['pipeline cpu'] / new['pipeline cpu']:.2f}x, server CPU "
              f"{o['server cpu'] / new['server cpu']:.2f}x")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, help="another checkout (its own server and client) to alternate with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=1000)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    run(args.old, args.rounds, args.lines, args.size)


if __name__ == "__main__":
    main()
