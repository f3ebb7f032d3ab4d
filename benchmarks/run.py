"""The logd-trio benchmark suite: every figure of BENCHMARKS.md, each against the Python ceiling.

Run from the repository root (about 4 minutes with the defaults)::

    python benchmarks/run.py                   # everything
    python benchmarks/run.py ingest reads      # some sections
    python benchmarks/run.py --duration 1 --json results.json

Sections:

``pipeline``  200k lines of 1000 bytes into one writer over one connection
              (``logd write`` when the client CLI exists, and
              always the bench engine's own pipelined line writer), fsync
              always (the default durability) and never.
``ingest``    ``logd bench --only-write``: 1, 4, 16 connections of 64 KB
              batches, 31 B and 1000 B messages, fsync always and never, data
              on disk (/tmp) and on tmpfs (/dev/shm); the tmpfs / never runs
              also do the read phase (``logd bench``'s read figures).
``reads``     200k messages read to /dev/null; 16 concurrent readers.
``headline``  ``yes "$L" | head -n 200000 | logd write`` and ``logd write`` of
              one line, against the bench engine's pipelined line writer, same
              server, same run (``benchmarks/headline.py``; ``--old TREE``
              alternates rounds with another checkout).
``restart``   time from process start to listening, 10 MB and 1 GB of small
              batches (files generated directly in the stored frame format,
              index included; deleted afterwards).
``perrequest`` server CPU per request (µs, utime + stime from /proc over the
              measured phase / requests served): BATCH of 64 KB of 31-byte
              messages and READ of one batch per request, tmpfs, fsync
              never, 1 and 16 connections, one request in flight per
              connection (``--in-flight 1``, Go's log-cli pattern) and
              pipelined (32); the ceiling is ``baseline.py reqrep`` /
              ``readone`` (same pattern, no protocol).  Then the piped
              headline: ``yes "$L" | head -n 200000 | logd write``, L of
              1000 bytes, default durability (fsync always, disk), timed as a
              whole process (median of 3): the ``headline`` section.
(rss)         server RSS and CPU under 16 busy connections: sampled from
              /proc during every ingest run, reported for the 16-connection ones.

Each server is a fresh ``logd serve`` process on 127.0.0.1 with a fresh data
directory; the load runs in this process.  The baseline
(``benchmarks/baseline.py``) is measured in the same run for the same I/O.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import baseline  # noqa: E402
import headline  # noqa: E402
import pipeline  # noqa: E402
from procs import stop_server  # noqa: E402

from logd_trio.core.framing import build_body, build_frame  # noqa: E402
from logd_trio.server.storage.index import HEADER as INDEX_HEADER  # noqa: E402
from logd_trio.tools.bench import BenchConfig, PhaseResult, read_messages, run_bench  # noqa: E402

DISK = Path("/tmp/logd-bench")
TMPFS = Path("/dev/shm/logd-bench")
GO = {  # the quoted yardstick: Go logd on this machine class (MiB/s)
    ("write", 1, 31): 502.0, ("write", 16, 31): 921.0, ("write", 1, 1000): 502.0, ("write", 16, 1000): 921.0,
    ("read", 1): 369.0, ("read", 16): 1300.0,
}
SERVER_CMD = "import sys; from cli.main import main; sys.argv[0] = 'logd'; main()"


# ---------------------------------------------------------------- server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    """Poll-connect every 2 ms; the monotonic time the port accepted."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            try:
                s.connect(("127.0.0.1", port))
                return time.monotonic()
            except OSError:
                time.sleep(0.002)
    raise RuntimeError("server did not listen in time")


@dataclass
class Usage:
    """Peak RSS and CPU seconds of a process over a window (sampled from /proc)."""

    rss_max_mib: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_s / self.wall_s if self.wall_s else 0.0


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def sampled(pid: int) -> Iterator[Usage]:
    usage = Usage()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(OSError):
                usage.rss_max_mib = max(usage.rss_max_mib, _rss_mib(pid))

    t = threading.Thread(target=sample, daemon=True)
    c0, w0 = _cpu(pid), time.monotonic()
    t.start()
    try:
        yield usage
    finally:
        stop.set()
        t.join()
        usage.cpu_s, usage.wall_s = _cpu(pid) - c0, time.monotonic() - w0
        usage.rss_max_mib = max(usage.rss_max_mib, _rss_mib(pid))


@contextlib.contextmanager
def logd_server(workdir: Path, *args: str, fresh: bool = True) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    port = free_port()
    cmd = [sys.executable, "-c", SERVER_CMD, "serve", "--host", f"127.0.0.1:{port}", "--workdir", str(workdir),
           "--idle-timeout", "0", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield port, proc
    finally:
        stop_server(proc)


# ---------------------------------------------------------------- results


@dataclass
class Row:
    section: str
    case: str
    value: float
    unit: str
    baseline: float | None = None  # same unit, Python ceiling, same run
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None


ROWS: list[Row] = []


def report(row: Row) -> None:
    ROWS.append(row)
    r = f"{row.ratio:5.2f}x" if row.ratio is not None else "     "
    b = f"{row.baseline:10.1f}" if row.baseline is not None else " " * 10
    extra = "  ".join(f"{k} {v}" for k, v in row.extra.items())
    print(f"  {row.case:44} {row.value:10.1f} {row.unit:8} baseline {b}  {r}  {row.target:18} {extra}",
          flush=True)


def lat_ms(phase: PhaseResult) -> str:
    p = phase.percentiles()
    return "/".join(f"{p[k] * 1000:.1f}" for k in ("p50", "p99")) if p else "-"


# ---------------------------------------------------------------- sections


def section_pipeline(args: argparse.Namespace) -> None:
    print("pipeline: 200k x 1000-byte lines, one writer, one connection", flush=True)
    lines = Path("/tmp/logd-bench-lines.txt")
    pipeline.make_lines(lines, 200_000, 1000)
    total = lines.stat().st_size
    base = baseline.run("ingest", 1, args.duration, directory=DISK / "bl", fsync=True)
    base_never = baseline.run("ingest", 1, args.duration, directory=DISK / "bl")
    logd_write = pipeline.has_logd_write()
    for fsync, bl, depth in (("always", base, 32), ("never", base_never, 32), ("always", base, 128)):
        bl_msgs = bl["mib_per_s"] * 2**20 / 1003  # the same bytes, as 1000-byte lines + newline
        target = ">= 350000 msg/s" if fsync == "always" else "> the always figure"
        runs = []
        for _ in range(3):  # median of 3: one run is under a second
            with logd_server(DISK / "data", "--fsync", fsync, "--pipeline-depth", str(depth)) as (port, _):
                runs.append(trio.run(pipeline.write_lines, f"127.0.0.1:{port}", "pipeline", lines, depth))
        res = sorted(runs, key=lambda r: r["messages_per_s"])[1]
        case = f"bench-engine line writer, fsync {fsync}" + (f", depth {depth}" if depth != 32 else "")
        report(Row("pipeline", case, res["messages_per_s"], "msg/s", bl_msgs, target,
                   {"MB/s": round(res["bytes"] / res["seconds"] / 1e6, 1),
                    "all runs": [round(r["messages_per_s"]) for r in runs]}))
        if depth != 32:
            continue
        if logd_write:
            with logd_server(DISK / "data", "--fsync", fsync) as (port, _):
                dt = pipeline.run_logd_write(f"127.0.0.1:{port}", "pipeline", lines)
            report(Row("pipeline", f"logd write < file, fsync {fsync}", 200_000 / dt, "msg/s", bl_msgs, target,
                       {"MB/s": round(total / dt / 1e6, 1)}))
    lines.unlink()


def section_ingest(args: argparse.Namespace) -> None:
    print("ingest: logd bench, 64 KB batches (MiB/s of requests)", flush=True)
    media = [("tmpfs", TMPFS), ("disk", DISK)]
    for medium, root in media:
        for fsync in ("never", "always"):
            for conns in (1, 4, 16):
                bl = baseline.run("ingest", conns, args.duration, directory=root / "bl", fsync=fsync == "always")
                for msize in (31, 1000):
                    read = medium == "tmpfs" and fsync == "never" and conns in (1, 16)
                    cfg = BenchConfig(conns=conns, topics=1, duration=args.duration, size=65500,
                                      message_size=msize, read=read)
                    with logd_server(root / "data", "--fsync", fsync) as (port, proc), sampled(proc.pid) as use:
                        res = trio.run(run_bench, BenchConfig(**{**_fields(cfg), "host": f"127.0.0.1:{port}"}))
                    assert res.write is not None
                    go = GO.get(("write", conns, msize))
                    target = ""
                    if medium == "tmpfs" and fsync == "never" and go:
                        target = f">= {go * (0.5 if msize == 31 else 1.0):.0f} MiB/s (Go {go:.0f})"
                    w = res.write
                    report(Row("ingest", f"{medium} fsync={fsync} conns={conns} msg={msize}B", w.mib_per_s, "MiB/s",
                               bl["mib_per_s"], target,
                               {"msg/s": round(w.messages_per_s), "ack p50/p99 ms": lat_ms(w),
                                "rss MiB": round(use.rss_max_mib), "cpu %": round(use.cpu_percent)}))
                    if conns == 16:
                        report(Row("rss", f"{medium} fsync={fsync} 16 conns msg={msize}B", use.rss_max_mib, "MiB",
                                   None, "< 150 MiB", {"cpu %": round(use.cpu_percent)}))
                    if res.read is not None:
                        rgo = GO[("read", conns)]
                        rd = res.read
                        rb = baseline.run("read", conns, args.duration, file=_some_log(root / "data"))
                        report(Row("reads", f"bench read conns={conns} msg={msize}B", rd.mib_per_s, "MiB/s",
                                   rb["mib_per_s"], f">= {rgo:.0f} MiB/s (Go)",
                                   {"reply p50/p99 ms": lat_ms(rd)}))
        shutil.rmtree(root, ignore_errors=True)


def _fields(cfg: BenchConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def _some_log(workdir: Path) -> Path:
    return max(workdir.glob("*/*.log"), key=lambda p: p.stat().st_size)


def section_reads(args: argparse.Namespace) -> None:
    print("reads: 200k messages of 1000 B to /dev/null; 16 concurrent readers", flush=True)
    lines = Path("/tmp/logd-bench-lines.txt")
    pipeline.make_lines(lines, 200_000, 1000)
    root = TMPFS
    with logd_server(root / "data", "--fsync", "never") as (port, _):
        trio.run(pipeline.write_lines, f"127.0.0.1:{port}", "reads", lines)
        lines.unlink()

        async def read_200k() -> PhaseResult:
            phase = PhaseResult("read")
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with stream.socket as sock:
                t0 = time.perf_counter()
                await read_messages(sock, "reads", 0, 200_000, phase)
                phase.seconds = time.perf_counter() - t0
            return phase

        times = [trio.run(read_200k) for _ in range(3)]
        best = min(times, key=lambda p: p.seconds)
        logfile = _some_log(root / "data")
        bl = baseline.run("read", 1, args.duration, file=logfile)
        report(Row("reads", "200k x 1000 B read to /dev/null (1 conn)", best.mib_per_s, "MiB/s", bl["mib_per_s"],
                   ">= 369 MiB/s (Go)",
                   {"msg/s": round(best.messages_per_s), "seconds": round(best.seconds, 3)}))
        res = trio.run(run_bench, BenchConfig(host=f"127.0.0.1:{port}", conns=16, topics=1, duration=args.duration,
                                              message_size=1000, write=True, read=True))
        assert res.read is not None
        bl16 = baseline.run("read", 16, args.duration, file=_some_log(root / "data"))
        report(Row("reads", "16 concurrent readers (bench, 1000 B msgs)", res.read.mib_per_s, "MiB/s",
                   bl16["mib_per_s"], ">= 1300 MiB/s (Go)", {"reply p50/p99 ms": lat_ms(res.read)}))
    shutil.rmtree(root, ignore_errors=True)


def make_topic_files(topic_dir: Path, total: int, batch: int = 4096, message_size: int = 31) -> int:
    """Write ``total`` bytes of identical small batches as 0.log + 0.index (the stored formats: a
    version-2 index, every batch stamped a second before now)."""
    topic_dir.mkdir(parents=True, exist_ok=True)
    msg = b"x" * message_size
    per = len(b"MSG %d\r\n" % message_size) + message_size + 2
    count = (batch - 60) // per
    frame = build_frame(topic_dir.name, build_body([msg] * count), count)
    n = total // len(frame)
    chunk_frames = max(1, (4 << 20) // len(frame))
    chunk = frame * chunk_frames
    rec = struct.Struct("<QQQ")
    stamp = time.time_ns() // 1_000_000 - 1000
    with open(topic_dir / "0.log", "wb") as log, open(topic_dir / "0.index", "wb") as idx:
        idx.write(INDEX_HEADER)
        done = 0
        while done < n:
            k = min(chunk_frames, n - done)
            log.write(chunk if k == chunk_frames else frame * k)
            idx.write(b"".join(rec.pack((done + i + 1) * len(frame), (done + i + 1) * count, stamp)
                               for i in range(k)))
            done += k
    return n


def section_restart(args: argparse.Namespace) -> None:
    print("restart: process start to listening (median of 3), small batches", flush=True)
    root = Path("/tmp/logd-bench-restart")
    results: dict[str, float] = {}
    for label, size in (("10 MB", 10 * 10**6), ("1 GB", 10**9)):
        shutil.rmtree(root, ignore_errors=True)
        nb = make_topic_files(root / "data" / "restart", size)
        times = []
        first = 0.0
        for i in range(4):
            port = free_port()
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVER_CMD, "serve", "--host", f"127.0.0.1:{port}", "--workdir",
                 str(root / "data")], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                dt = wait_listening(port, proc) - t0
            finally:
                stop_server(proc)
            if i == 0:
                first = dt
            else:
                times.append(dt)
        results[label] = statistics.median(times)
        report(Row("restart", f"restart with {label} ({nb} batches of ~4 KB)", results[label] * 1000, "ms", None,
                   "1 GB <= 1.2 x 10 MB", {"first start ms": round(first * 1000)}))
    shutil.rmtree(root, ignore_errors=True)
    ratio = results["1 GB"] / results["10 MB"]
    report(Row("restart", "restart 1 GB / restart 10 MB", ratio, "x", None, "<= 1.2"))


def _cpu_split(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _per_request(pid: int, cfg: BenchConfig) -> tuple[PhaseResult, float, float]:
    """Run one phase; (phase, server user µs per request, server system µs per request)."""
    u0, s0 = _cpu_split(pid)
    res = trio.run(run_bench, cfg)
    u1, s1 = _cpu_split(pid)
    phase = res.write if res.write is not None else res.read
    assert phase is not None and phase.requests > 0
    return phase, (u1 - u0) / phase.requests * 1e6, (s1 - s0) / phase.requests * 1e6


def section_perrequest(args: argparse.Namespace) -> None:
    print("perrequest: server CPU per request (µs), 64 KB batches of 31 B, tmpfs, fsync never", flush=True)
    root = TMPFS
    targets = {("BATCH", 1, 16): "<= 70 µs", ("READ", 1, 16): "<= 45 µs"}
    for conns in (1, 16):
        for in_flight in (1, 32):
            pattern = "one in flight" if in_flight == 1 else f"pipelined {in_flight}"
            with logd_server(root / "data", "--fsync", "never") as (port, proc):
                host = f"127.0.0.1:{port}"
                common = {"host": host, "conns": conns, "duration": args.duration, "size": 65500,
                          "message_size": 31, "in_flight": in_flight, "read_batches": 1}
                w, wu, ws = _per_request(proc.pid, BenchConfig(**common, read=False))
                r, ru, rs = _per_request(proc.pid, BenchConfig(**common, write=False))
                frame_len = w.bytes // w.batches
                bl_w = bl_r = None
                if in_flight == 1:
                    log = _some_log(root / "data")
                    bl_w = baseline.run("reqrep", conns, args.duration, directory=root / "bl", chunk=frame_len)
                    bl_r = baseline.run("readone", conns, args.duration, file=log, chunk=frame_len)
            for kind, phase, user, system, bl in (("BATCH", w, wu, ws, bl_w), ("READ", r, ru, rs, bl_r)):
                report(Row("perrequest", f"{kind} conns={conns} {pattern}", user + system, "µs/req",
                           bl["server_cpu_us_per_request"] if bl else None, targets.get((kind, in_flight, conns), ""),
                           {"user µs": round(user, 1), "sys µs": round(system, 1),
                            "req/s": round(phase.requests / phase.seconds),
                            "p50/p99 ms": lat_ms(phase)}))
    shutil.rmtree(root, ignore_errors=True)
    if "headline" not in (args.sections or SECTIONS):  # else that section runs it (once)
        _piped_headline(args)


def _piped_headline(args: argparse.Namespace) -> None:
    n, size = 200_000, 1000
    print(f"headline: yes | head -n {n} | logd write, {size} B lines, fsync always (disk), median of 3",
          flush=True)
    summary = headline.run(args.old, 3, n, size)
    new, ceiling = summary["NEW"], summary["ceiling"]
    report(Row("headline", f"yes | head -n {n} | logd write (s)", new["s"], "s", None, "",
               {"pipeline CPU s": round(new["pipeline cpu"], 2), "server CPU s": round(new["server cpu"], 2)}))
    report(Row("headline", "yes | head | logd write, fsync always", new["msg/s"], "msg/s", ceiling["msg/s"],
               "1.5 x Go's rate", {"MB/s": round(n * (size + 1) / new["s"] / 1e6, 1)}))
    report(Row("headline", "logd write of one line (s)", new["one line s"], "s"))
    if "OLD" in summary:
        old = summary["OLD"]
        report(Row("headline", "OLD time / NEW time, piped", old["s"] / new["s"], "x", None, "~2.5"))
        report(Row("headline", "OLD time / NEW time, one line", old["one line s"] / new["one line s"], "x"))


SECTIONS = {"pipeline": section_pipeline, "ingest": section_ingest, "reads": section_reads,
            "restart": section_restart, "perrequest": section_perrequest, "headline": _piped_headline}


def calibrate() -> float:
    """CPU seconds of a fixed pure-Python loop: compares the speed of the cores between runs."""
    t0 = time.process_time()
    total = 0
    for i in range(2_000_000):
        total += i
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", choices=[*SECTIONS, []], default=[])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per measured phase [2]")
    ap.add_argument("--json", type=Path, help="also write every row to this file")
    ap.add_argument("--old", type=Path, help="headline: another checkout to alternate with (OLD/NEW rounds)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, {os.uname().release}, python {sys.version.split()[0]}, "
          f"load {os.getloadavg()[0]:.2f}, calibration {calibrate():.3f} CPU-s", flush=True)
    t0 = time.monotonic()
    for name in args.sections or SECTIONS:
        SECTIONS[name](args)
    print(f"total {time.monotonic() - t0:.0f}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"ratio": r.ratio} for r in ROWS], indent=1))


if __name__ == "__main__":
    main()
