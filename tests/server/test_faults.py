"""Fault injection: corrupt files, power loss, disk full, graceful shutdown
under load, repeated SIGKILL, resource limits.  See docs/durability.md for the
claims these tests prove."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from logd_trio.core.framing import parse_frame_header
from logd_trio.server.config import ConfigError, ServerConfig, load_config
from logd_trio.server.storage import space, syscalls
from logd_trio.server.storage.partition import Ranges
from logd_trio.server.storage.rebuild import IndexSuspect
from logd_trio.server.storage.topic_log import TopicLog

from .. import harness
from ..harness import ServerProcess, make_config, spawn, start_server
from ..wire import Wire, batch_request
from .gates import GatedUnlink
from .index_files import put_end, records
from .test_server import capture_topics

# ---------------------------------------------------------------- helpers


@pytest.fixture
def fast_vclock() -> trio.testing.MockClock:
    """Virtual time that jumps after 10 ms of real idleness (conftest's vclock waits 50 ms):
    for tests with many virtual sleeps whose worker-thread work is tiny."""
    return trio.testing.MockClock(autojump_threshold=0.01)


def fill_topic(root: Path, topic: str, n: int, *, psize: int, seed: int = 0) -> tuple[list[int], list[bytes]]:
    """Write ``n`` varied batches with the storage layer (as an earlier process would) and close cleanly."""
    rng = random.Random(seed)
    tl = TopicLog.open(root, topic, partition_size=psize, partitions=10_000)
    offs: list[int] = []
    frames: list[bytes] = []
    for i in range(n):
        msgs = [b"m%d-%d-" % (i, j) + bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
                for j in range(rng.randint(1, 3))]
        f = batch_request(topic, msgs)
        offs.append(tl.append(f, len(msgs)))
        frames.append(f)
    tl.close()
    return offs, frames


def partitions_of(d: Path) -> list[int]:
    return sorted(int(p.name[:-4]) for p in d.glob("*.log") if p.name[:-4].isdigit())


def flip_byte(path: Path, pos: int, rng: random.Random) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([old ^ rng.randrange(1, 256)]))


def frame_is_valid(frame: bytes, topic: str) -> bool:
    h = parse_frame_header(frame)
    return (h is not None and h.frame_len == len(frame) and h.topic == topic.encode()
            and zlib.crc32(frame[h.header_len :]) == h.crc)


async def read_one(w: Wire, topic: str, off: int, limit: int = 1) -> tuple[bytes, list[bytes]]:
    await w.send(b"READ %s %d %d\r\n" % (topic.encode(), off, limit))
    return await w.read_reply()


# ---------------------------------------------------------------- 2. corrupt files: never serve a bad CRC


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 12)), max_size=12), st.integers(0, 80),
       st.integers(0, 80))
def test_ranges_model(adds: list[tuple[int, int]], a: int, b: int) -> None:
    """The interval set behind verified/bad ranges agrees with a set-of-positions model."""
    r = Ranges()
    model: set[int] = set()
    for start, n in adds:
        r.add(start, start + n)
        model.update(range(start, start + n))
    assert all(s < e for s, e in zip(r.starts, r.ends, strict=True))
    assert all(e < s for e, s in zip(r.ends, r.starts[1:], strict=False))  # disjoint, not touching
    assert {x for s, e in zip(r.starts, r.ends, strict=True) for x in range(s, e)} == model
    missing = {x for s, e in r.missing(a, b) for x in range(s, e)}
    assert missing == set(range(a, b)) - model
    hit = r.first_overlap(a, b)
    inside = sorted(model & set(range(a, b)))
    if not inside:
        assert hit is None
    else:
        assert hit is not None and hit[0] <= inside[0] < hit[1]


async def test_flipped_bytes_in_sealed_partitions_are_never_served(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Byte flips inside old, indexed partitions (the index is fine, so startup does not look):
    the server starts, serves every valid frame, answers ``ERR corrupt data`` for each damaged
    batch (never its bytes), stops long reads before it, copies it aside and logs it.  Also:
    a missing and a truncated index, an empty partition file and stray files."""
    caplog.set_level(logging.WARNING)
    root = tmp_path / "d"
    offs, frames = fill_topic(root, "c", 90, psize=2500)
    d = root / "c"
    starts = partitions_of(d)
    assert len(starts) >= 5
    rng = random.Random(17)
    # flips: in sealed partitions 2.. (not the head), at random positions of random frames
    bad: dict[int, int] = {}  # frame number -> flipped position in its partition
    for _ in range(8):
        k = rng.choice([k for k, o in enumerate(offs) if starts[2] <= o < starts[-1]])
        part = max(s for s in starts if s <= offs[k])
        pos = offs[k] - part + rng.randrange(len(frames[k]))
        flip_byte(d / f"{part}.log", pos, rng)
        bad[k] = pos
    (d / f"{starts[0]}.index").unlink()  # missing index: rebuilt (and so verified) at startup
    idx1 = d / f"{starts[1]}.index"
    idx1.write_bytes(idx1.read_bytes()[:40])  # truncated index: the rest rescanned
    head = offs[-1] + len(frames[-1])
    (d / f"{head}.log").write_bytes(b"")  # an empty (new head) partition file
    for stray in ("notes.txt", "abc.log", "007.log"):
        (d / stray).write_bytes(b"not a partition")

    srv = await start_server(nursery, make_config(root, scrub_rate=0))  # no scrub: reads verify inline
    w = await Wire.connect(srv.host, srv.port)
    served = corrupt = 0
    for k, (off, f) in enumerate(zip(offs, frames, strict=True)):
        reply, got = await read_one(w, "c", off)
        if k in bad:
            assert reply == b"ERR corrupt data\r\n", (k, reply)
            corrupt += 1
        else:
            assert got == [f], k
            served += 1
    assert corrupt == len(bad) and served == len(frames) - len(bad)
    # a long read from the start stops right before the first damaged batch
    first_bad = min(bad)
    _, got = await read_one(w, "c", 0, 50_000)
    assert got == frames[:first_bad]
    # reading on after it: every frame served anywhere is valid and is what was written
    for k in sorted(bad):
        if k + 1 < len(frames) and k + 1 not in bad:
            _, got = await read_one(w, "c", offs[k + 1], 50_000)
            assert got and all(frame_is_valid(g, "c") for g in got)
            assert got == frames[k + 1 : k + 1 + len(got)]
    # copied aside (the damaged bytes, exactly one frame's length each) and logged loudly
    copies = sorted(d.glob("*.log.corrupt-*"))
    assert len(copies) == len(bad)
    assert sorted(c.stat().st_size for c in copies) == sorted(len(frames[k]) for k in bad)
    errors = [r.getMessage() for r in caplog.records if "CORRUPTION" in r.getMessage()]
    assert len(errors) == len(bad)
    assert all("ERR corrupt data" in e and "copied to" in e for e in errors)
    assert any("stray file" in r.getMessage() and "notes.txt" in r.getMessage() for r in caplog.records)
    assert (d / "notes.txt").read_bytes() == b"not a partition"
    # writing continues at the right offset
    await w.send(batch_request("c", [b"after"]))
    assert await w.reply() == b"OK %d 1\r\n" % head
    await srv.stop()

    # a restart finds the same damage again (the index still vouches for it) but copies nothing twice
    caplog.clear()
    srv = await start_server(nursery, make_config(root, scrub_rate=0))
    w = await Wire.connect(srv.host, srv.port)
    for k in bad:
        reply, _ = await read_one(w, "c", offs[k])
        assert reply == b"ERR corrupt data\r\n"
    assert len(list(d.glob("*.log.corrupt-*"))) == len(bad)
    await srv.stop()


async def test_corruption_in_the_head_partition_keeps_later_batches(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A flip in the indexed (not re-verified) part of the head partition: only that batch is
    withheld; batches before and after it, this process's new ones included, are served."""
    root = tmp_path / "d"
    offs, frames = fill_topic(root, "h", 1500, psize=1 << 30)  # one partition, well over the 64 KiB window
    d = root / "h"
    assert partitions_of(d) == [0]
    assert offs[-1] > 2 * 64 * 1024
    k = 100
    flip_byte(d / "0.log", offs[k] + len(frames[k]) // 2, random.Random(3))
    srv = await start_server(nursery, make_config(root, scrub_rate=0))
    w = await Wire.connect(srv.host, srv.port)
    new = [batch_request("h", [b"new %d" % i]) for i in range(5)]
    await w.send(b"".join(new))
    head = offs[-1] + len(frames[-1])
    for i in range(5):
        assert await w.reply() == b"OK %d 1\r\n" % (head + sum(map(len, new[:i])))
    _, got = await read_one(w, "h", 0, 50_000)
    assert got == frames[:k]
    reply, _ = await read_one(w, "h", offs[k])
    assert reply == b"ERR corrupt data\r\n"
    _, got = await read_one(w, "h", offs[k + 1], 50_000)
    assert got == frames[k + 1 :] + new
    await srv.stop()


async def test_scrub_finds_corruption_before_any_read(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    vclock: trio.testing.MockClock,
) -> None:
    """The background scrub verifies old partitions at --scrub-rate (virtual time here); once it is
    done, reads go straight to sendfile (no checks left) and the damage was logged and copied."""
    caplog.set_level(logging.INFO)
    topics = capture_topics(monkeypatch)
    root = tmp_path / "d"
    offs, frames = fill_topic(root, "s", 300, psize=4000)
    d = root / "s"
    starts = partitions_of(d)
    k = next(i for i, o in enumerate(offs) if o > starts[1])
    part = max(s for s in starts if s <= offs[k])
    flip_byte(d / f"{part}.log", offs[k] - part + 5, random.Random(9))
    total = sum((d / f"{s}.log").stat().st_size for s in starts)
    rate = 10_000
    t0 = trio.current_time()
    srv = await start_server(nursery, make_config(root, scrub_rate=rate))
    tl = topics["s"].log
    assert tl.unverified_bytes > 0
    with trio.fail_after(10 * total / rate):
        while not any("scrub done" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
            await trio.sleep(0.5)  # polling a log line, in virtual time
    elapsed = trio.current_time() - t0
    assert tl.unverified_bytes == 0
    assert elapsed >= 0.9 * (total - 8 * 1024) / rate  # paced: the rate bounds the scrub's I/O
    assert any("CORRUPTION" in r.getMessage() for r in caplog.records)
    assert len(list(d.glob("*.log.corrupt-*"))) == 1
    for off in offs[:k]:
        with tl.read_plan(off, 1000) as plan:
            assert plan.checks == []
    w = await Wire.connect(srv.host, srv.port)
    reply, _ = await read_one(w, "s", offs[k])
    assert reply == b"ERR corrupt data\r\n"
    _, got = await read_one(w, "s", offs[k + 1])
    assert got == [frames[k + 1]]
    await srv.stop()


def test_wrong_index_record_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    """An index whose middle record is wrong (sampling at open cannot see it) while the log is
    intact: verification finds the disagreement, the index is rebuilt from the log, and every
    batch is served with its own bytes; nothing is copied aside (the log is not damaged)."""
    root = tmp_path / "d"
    offs, frames = fill_topic(root, "x", 200, psize=6000)
    d = root / "x"
    s0 = partitions_of(d)[0]
    raw = bytearray((d / f"{s0}.index").read_bytes())
    recs = records(raw)
    n = len(recs)
    mid = n // 2 + 1
    put_end(raw, mid, recs[mid][0] + 3)
    (d / f"{s0}.index").write_bytes(bytes(raw))
    tl = TopicLog.open(root, "x", partition_size=6000, partitions=10_000)
    try:
        job = tl.verify_job([(s0, 0, offs[n] - s0)])
        job.run()
        with pytest.raises(IndexSuspect) as ei:
            tl.apply_verification(job)
        rebuild = tl.rebuild_job(ei.value.start, ei.value.generation)
        assert rebuild is not None and ei.value.start == s0
        rebuild.run()
        tl.apply_rebuild(rebuild)
        for k in range(n):
            with tl.read_plan(offs[k], 1) as plan:
                assert plan.checks == []  # the rebuild's scan verified the partition
                data = b"".join(os.pread(fd, ln, pos) for fd, pos, ln in plan.segments)
            assert data == frames[k], k
        assert not list(d.glob("*.corrupt-*"))
    finally:
        tl.close()
    tl = TopicLog.open(root, "x", partition_size=6000, partitions=10_000)  # the rebuilt index is on disk
    try:
        with tl.read_plan(offs[mid], 1) as plan:
            assert b"".join(os.pread(fd, ln, pos) for fd, pos, ln in plan.segments) == frames[mid]
    finally:
        tl.close()


# ---------------------------------------------------------------- 3. disk full


class _InjectedDisk(syscalls.Layer):
    """Fallback when tmpfs cannot be mounted: a byte budget on the storage layer's pwrites."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, pos: int) -> int:
        n = len(data)
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(n, self.budget)
        w = self.inner.pwrite(fd, bytes(data)[:n], pos)
        self.budget -= w
        return w


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """A small filesystem at ``path``: tmpfs when we may mount (root, as in CI), else an injected budget.

    Yields ``(mechanism, free_space)``: ``free_space()`` frees the room the test's filler took.
    """
    path.mkdir()
    mounted = False
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                           capture_output=True, timeout=10)
        mounted = r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        pass
    if mounted:
        try:
            filler = path / "filler"
            with open(filler, "wb") as f:  # a stray file that takes most of the room
                f.write(b"\0" * (int(size.rstrip("m")) * 1024 * 1024 - 600 * 1024))
            yield "tmpfs", filler.unlink
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)
    else:
        with syscalls.install(_InjectedDisk(500 * 1024)) as disk:

            def free() -> None:
                disk.budget += 10 << 20

            yield "injected ENOSPC (storage syscalls)", free


async def test_disk_full_clear_error_no_partial_frame_and_recovery(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock,
    record_property: Callable[[str, object], None],
) -> None:
    """Write until ENOSPC: the BATCH gets ``ERR storage error: ...``, no partial frame stays on
    disk, reads keep working, and writes succeed at the right offset once space frees."""
    with small_disk(tmp_path / "mnt", "2m") as (mechanism, free_space):
        record_property("disk_full_mechanism", mechanism)
        print(f"disk full via {mechanism}")
        root = tmp_path / "mnt" / "data"
        srv = await start_server(nursery, make_config(root, fsync="always", min_free_space=0,
                                                      partition_size=200 * 1024))
        w = await Wire.connect(srv.host, srv.port)
        acked: list[bytes] = []
        rng = random.Random(1)
        for i in range(10_000):
            req = batch_request("full", [b"%d " % i + rng.randbytes(rng.randrange(1000, 9000))])
            await w.send(req)
            reply = await w.reply()
            if not reply.startswith(b"OK "):
                break
            assert reply == b"OK %d 1\r\n" % sum(map(len, acked))
            acked.append(req)
        assert reply.startswith(b"ERR storage error: "), reply
        assert b"No space left" in reply
        assert 20 < len(acked) < 10_000
        d = root / "full"
        # no partial frame: the partitions hold exactly the acknowledged frames
        on_disk = b"".join((d / f"{s}.log").read_bytes() for s in partitions_of(d))
        assert on_disk == b"".join(acked)
        # reads keep working while the disk is full
        await w.send(b"TAIL full 50000\r\n")
        _, frames = await w.read_reply()
        assert frames == acked
        await w.send(b"PING\r\n")
        assert await w.reply() == b"PONG\r\n"
        # space frees: writing continues at the right offset
        free_space()
        nxt = batch_request("full", [b"after the disk was full"])
        await w.send(nxt)
        assert await w.reply() == b"OK %d 1\r\n" % len(on_disk)
        await srv.stop()
        srv = await start_server(nursery, make_config(root, min_free_space=0, partition_size=200 * 1024))
        w = await Wire.connect(srv.host, srv.port)
        await w.send(b"TAIL full 50000\r\n")
        _, frames = await w.read_reply()
        assert frames == [*acked, nxt]
        await srv.stop()


async def test_min_free_space_refuses_before_the_disk_is_full(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock,
) -> None:
    """--min-free-space: writes are refused with a clear reason while free space is under the
    minimum (checked with statvfs at most every 100 ms), and accepted again once it is not."""
    root = tmp_path / "d"
    st_ = os.statvfs(tmp_path)
    free = st_.f_bavail * st_.f_frsize
    # a minimum just above what is free now: the first batch is refused
    srv = await start_server(nursery, make_config(root, min_free_space=free + (64 << 20)))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("g", [b"x"]))
    reply = await w.reply()
    m = re.fullmatch(rb"ERR storage error: disk nearly full \((\d+) bytes free, minimum (\d+)\)\r\n", reply)
    assert m is not None, reply
    assert int(m.group(2)) == free + (64 << 20)
    assert not (root / "g").exists() or partitions_of(root / "g") in ([], [0])
    await w.send(b"READ g 0 1\r\n")
    assert await w.reply() == b"ERR not found\r\n"
    await srv.stop()
    # the same disk with a sane minimum: accepted
    srv = await start_server(nursery, make_config(root, min_free_space=1 << 20))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("g", [b"x"]))
    assert await w.reply() == b"OK 0 1\r\n"
    await srv.stop()


class CountingStatvfs(syscalls.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Path] = []

    def statvfs(self, path: Path) -> os.statvfs_result:
        self.calls.append(path)
        return self.inner.statvfs(path)


def test_free_space_guard_checks_rarely() -> None:
    """statvfs at most every FREE_SPACE_PERIOD or FREE_SPACE_BYTES appended, not per batch."""
    with syscalls.install(CountingStatvfs()) as layer:
        _guard_checks_rarely(layer.calls)


def _guard_checks_rarely(calls: list[Path]) -> None:
    now = 100.0
    guard = space.FreeSpace(Path("/"), 1)
    for _ in range(1000):
        assert guard.refuse(100, now) is None
    assert len(calls) == 1
    now += space.FREE_SPACE_PERIOD
    assert guard.refuse(100, now) is None
    assert len(calls) == 2
    for _ in range(space.FREE_SPACE_BYTES // 65536 + 2):
        guard.refuse(65536, now)
    assert len(calls) == 3


# ---------------------------------------------------------------- 1. power loss


class PowerLoss(syscalls.Layer):
    """Fault-injection layer over the storage layer's syscalls: records what fsync made durable.

    * ``fsync``/``fdatasync`` of a file: its size at the *start* of the call is durable once
      the call *returns* (``delay`` seconds later: an OK sent while an fsync still runs is
      caught);
    * ``fsync`` of a directory: likewise its entries at the start of the call;
    * ``unlink`` of a file whose entry is durable: the file comes back after a power loss
      (with its synced prefix) until a later directory fsync sees it gone;
    * everything present when the layer is installed counts as durable.

    :meth:`snapshot` builds what a power loss would leave: per file only the synced prefix,
    and only the entries of each directory that its last directory fsync saw (a new partition
    whose directory was not fsynced vanishes; an unlinked one not yet fsynced away returns).
    The real fsync is not called (not needed to simulate, and fast).
    """

    def __init__(self, root: Path, delay: float = 0.0) -> None:
        super().__init__()
        self.root = str(root)
        self.delay = delay
        self.lock = threading.Lock()
        self.synced: dict[str, int] = {}
        self.entries: dict[str, set[str]] = {}
        self.ghosts: dict[str, bytes] = {}  # unlinked, entry still durable: back after a power loss
        self.syncs = 0
        for dirpath, dirnames, filenames in os.walk(root):
            self.entries[dirpath] = set(dirnames) | set(filenames)
            for f in filenames:
                self.synced[os.path.join(dirpath, f)] = os.path.getsize(os.path.join(dirpath, f))

    def fsync(self, fd: int) -> None:
        self.record(fd)

    def fdatasync(self, fd: int) -> None:
        self.record(fd)

    def record(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        st_ = os.fstat(fd)
        is_dir = stat.S_ISDIR(st_.st_mode)
        seen = set(os.listdir(path)) if is_dir else set()  # what the call covers: fixed at its start
        if self.delay:
            time.sleep(self.delay)
        with self.lock:  # ... and durable only once it returns
            self.syncs += 1
            if is_dir:
                self.entries[path] = seen
                for g in [g for g in self.ghosts if os.path.dirname(g) == path and os.path.basename(g) not in seen]:
                    del self.ghosts[g]
            else:
                self.synced[path] = st_.st_size

    def unlink(self, path: Path) -> None:
        p = str(path)
        with self.lock:
            if os.path.basename(p) in self.entries.get(os.path.dirname(p), ()) and os.path.exists(p):
                with open(p, "rb") as fh:
                    self.ghosts[p] = fh.read(self.synced.get(p, 0))
        self.inner.unlink(path)

    def durable(self, path: Path) -> int:
        """Bytes of ``path`` that survive a power loss now (0 if its entry would vanish)."""
        with self.lock:
            p = str(path)
            while p != self.root:
                parent = os.path.dirname(p)
                if os.path.basename(p) not in self.entries.get(parent, ()):
                    return 0
                p = parent
            return self.synced.get(str(path), 0)

    def snapshot(self, dest: Path) -> None:
        """What a power loss now would leave, copied to ``dest``."""
        with self.lock:
            dest.mkdir(parents=True)
            for dirpath, dirnames, filenames in os.walk(self.root):
                rel = os.path.relpath(dirpath, self.root)
                if rel != "." and not (dest / rel).exists():
                    dirnames[:] = []
                    continue
                keep = self.entries.get(dirpath, set())
                for d in dirnames:
                    if d in keep:
                        (dest / rel / d).mkdir()
                for f in filenames:
                    if f in keep:
                        src = os.path.join(dirpath, f)
                        with open(src, "rb") as fh:
                            (dest / rel / f).write_bytes(fh.read(self.synced.get(src, 0)))
            for g, data in self.ghosts.items():
                parent = dest / os.path.relpath(os.path.dirname(g), self.root)
                if parent.is_dir() and os.path.basename(g) in self.entries.get(os.path.dirname(g), ()):
                    (parent / os.path.basename(g)).write_bytes(data)


def recovered_frames(root: Path, topic: str) -> dict[int, bytes]:
    """Open a (snapshot) data dir as a restarting server would and read every batch by offset."""
    if not (root / topic).exists():
        return {}
    tl = TopicLog.open(root, topic, partition_size=1 << 40, partitions=1 << 20)
    out: dict[int, bytes] = {}
    try:
        off = tl.first
        while off < tl.head:
            with tl.read_plan(off, 1) as plan:
                data = b"".join(os.pread(fd, ln, pos) for fd, pos, ln in plan.segments)
            out[off] = data
            off += len(data)
    finally:
        tl.close()
    return out


async def _stream(srv_host: str, srv_port: int, topic: str, tag: int, n: int,
                  on_ok: Callable[[int, bytes], None]) -> None:
    """Pipeline ``n`` batches in groups of 10; call ``on_ok(offset, frame)`` for each OK."""
    w = await Wire.connect(srv_host, srv_port)
    rng = random.Random(tag)
    for g in range(0, n, 10):
        reqs = [batch_request(topic, [b"w%d-%d " % (tag, g + k) + rng.randbytes(rng.randrange(10, 400))])
                for k in range(10)]
        await w.send(b"".join(reqs))
        for req in reqs:
            line = await w.reply()
            assert line.startswith(b"OK "), line
            on_ok(int(line.split()[1]), req)
    await w.aclose()


async def test_power_loss_fsync_always_keeps_every_acknowledged_batch(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[PowerLoss], PowerLoss]
) -> None:
    """--fsync always: at every OK the batch is already durable (data synced, and the directory
    entries of new partitions too); power-loss snapshots taken while writers stream recover
    with every batch acknowledged before them, byte-identical."""
    root = tmp_path / "d"
    root.mkdir()
    pl = syscall_layer(PowerLoss(root, delay=0.002))  # an fsync takes time: durable when it returns
    srv = await start_server(nursery, make_config(root, fsync="always", partition_size=16 * 1024,
                                                  partitions=100_000, scrub_rate=0))
    acked: list[tuple[int, bytes]] = []
    not_durable: list[int] = []
    snapshots: list[tuple[Path, int]] = []

    def on_ok(off: int, frame: bytes) -> None:
        d = root / "pl"
        part = max(s for s in partitions_of(d) if s <= off)
        if pl.durable(d / f"{part}.log") < off - part + len(frame):
            not_durable.append(off)
        acked.append((off, frame))
        if len(acked) % 97 == 0:  # power loss now
            dest = tmp_path / f"snap{len(snapshots)}"
            pl.snapshot(dest)
            snapshots.append((dest, len(acked)))

    async with trio.open_nursery() as n:
        for tag in range(3):
            n.start_soon(_stream, srv.host, srv.port, "pl", tag, 200, on_ok)
    await srv.stop()
    assert len(acked) == 600 and len(partitions_of(root / "pl")) > 5  # rotations happened
    assert not_durable == [], f"{len(not_durable)} batches acknowledged before they were durable"
    lost = 0
    for dest, n_acked in snapshots:
        got = recovered_frames(dest, "pl")
        lost += sum(1 for off, f in acked[:n_acked] if got.get(off) != f)
    print(f"fsync=always: {len(acked)} acknowledged, {len(snapshots)} power losses, {lost} lost")
    assert lost == 0
    assert len(snapshots) >= 6


def test_power_loss_model_counts_an_fsync_once_it_returns(tmp_path: Path) -> None:
    """The model itself: bytes are durable only when the fsync covering them has returned
    (so an OK sent while that fsync runs is caught), and only the bytes written before it
    started; an unlinked file comes back until a directory fsync sees it gone."""
    root = tmp_path / "d"
    (root / "t").mkdir(parents=True)
    pl = PowerLoss(root, delay=0.3)
    path = root / "t" / "0.log"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    dfd = os.open(root / "t", os.O_RDONLY)
    try:
        os.write(fd, b"a" * 10)
        pl.fsync(dfd)
        t = threading.Thread(target=pl.fdatasync, args=(fd,))
        t.start()
        time.sleep(0.1)  # (a real sleep: only the order of events matters, never how long it took)
        os.write(fd, b"b" * 5)  # written while the fdatasync runs: not covered by it
        assert t.is_alive() and pl.durable(path) == 0
        t.join()
        assert pl.durable(path) == 10
        pl.delay = 0
        pl.unlink(path)
        pl.snapshot(tmp_path / "s1")
        assert (tmp_path / "s1" / "t" / "0.log").read_bytes() == b"a" * 10  # the unlink is not durable
        pl.fsync(dfd)
        pl.snapshot(tmp_path / "s2")
        assert not (tmp_path / "s2" / "t" / "0.log").exists()
    finally:
        os.close(fd)
        os.close(dfd)


def test_retention_unlinks_are_durable_at_close(
    tmp_path: Path, syscall_layer: Callable[[PowerLoss], PowerLoss]
) -> None:
    """Closing a log removes what retention dropped and then fsyncs the directory: a power
    loss after a clean close does not bring deleted partitions back (first never goes back)."""
    root = tmp_path / "d"
    root.mkdir()
    pl = syscall_layer(PowerLoss(root))
    tl = TopicLog.open(root, "rc", partition_size=300, partitions=2)
    for i in range(20):
        tl.append(batch_request("rc", [b"%03d" % i + b"x" * 80]), 1)
    tl.acknowledge(tl.head)
    first = tl.first
    tl.close()
    pl.snapshot(tmp_path / "snap")
    assert partitions_of(tmp_path / "snap" / "rc") == partitions_of(root / "rc")
    reopened = TopicLog.open(tmp_path / "snap", "rc", partition_size=300, partitions=2)
    assert reopened.first == first
    reopened.close()


async def test_retention_unlinks_are_made_durable_by_a_later_fsync(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[syscalls.Layer], syscalls.Layer]
) -> None:
    """An fsync that runs while retention's unlinks are still pending does not count for them
    (the directory was marked synced before the files were gone): after the unlinks a later
    directory fsync follows, so a power loss after shutdown does not resurrect them."""
    root = tmp_path / "d"
    root.mkdir()
    pl, gate = PowerLoss(root), GatedUnlink()
    syscall_layer(pl)
    syscall_layer(gate)
    gate.armed = True
    srv = await start_server(nursery, make_config(root, fsync="always", partition_size=300, partitions=2,
                                                  scrub_rate=0))
    w = await Wire.connect(srv.host, srv.port)
    i = 0
    while not gate.entered.is_set():  # until retention starts removing a partition
        await w.send(batch_request("ru", [b"%03d" % i + b"x" * 80]))
        assert (await w.reply()).startswith(b"OK ")
        i += 1
        await trio.sleep(0.01)
        assert i < 200
    await w.send(batch_request("ru", [b"while the unlink is held"]))  # an fsync while it is pending
    assert (await w.reply()).startswith(b"OK ")
    gate.armed = False
    gate.release.set()
    await srv.stop()
    pl.snapshot(tmp_path / "snap")
    assert partitions_of(tmp_path / "snap" / "ru") == partitions_of(root / "ru")


@pytest.mark.parametrize("mode", ["interval", "never"])
async def test_power_loss_fsync_interval_loses_at_most_the_last_interval(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[PowerLoss], PowerLoss],
    fast_vclock: trio.testing.MockClock, mode: str,
) -> None:
    """--fsync interval (virtual time): a power loss at T keeps every batch acknowledged at or
    before T - interval.  The same simulation with --fsync never loses more: proof that the
    simulation drops unsynced data (so the zero-loss results above mean something)."""
    interval = 0.5
    root = tmp_path / "d"
    root.mkdir()
    pl = syscall_layer(PowerLoss(root))
    srv = await start_server(nursery, make_config(root, fsync=mode, flush_interval=interval,
                                                  partition_size=64 * 1024, partitions=100_000, scrub_rate=0))
    acked: list[tuple[float, int, bytes]] = []
    w = await Wire.connect(srv.host, srv.port)
    snapshots: list[tuple[Path, float]] = []
    rng = random.Random(5)
    await trio.sleep(0.013)  # writes and power losses off the syncer's ticks
    for i in range(120):
        req = batch_request("iv", [b"%d " % i + rng.randbytes(rng.randrange(10, 900))])
        await w.send(req)
        line = await w.reply()
        assert line.startswith(b"OK "), line
        acked.append((trio.current_time(), int(line.split()[1]), req))
        if i % 17 == 16:
            dest = tmp_path / f"snap{i}"
            pl.snapshot(dest)
            snapshots.append((dest, trio.current_time()))
        await trio.sleep(0.05)
    await srv.stop()
    lost_total = 0
    for dest, t in snapshots:
        got = recovered_frames(dest, "iv")
        lost = [(ta, off) for ta, off, f in acked if ta <= t and got.get(off) != f]
        lost_total += len(lost)
        if mode == "interval":
            assert all(ta > t - interval for ta, _ in lost), (t, lost)
    print(f"fsync={mode}: {len(acked)} acknowledged, {len(snapshots)} power losses, {lost_total} lost")
    if mode == "interval":
        assert lost_total > 0  # the last interval really is at risk: the simulation bites
    else:
        assert lost_total > 2 * len(snapshots) * interval / 0.05


# ---------------------------------------------------------------- 4, 5. real processes: SIGTERM under load, SIGKILL


async def topic_range(w: Wire, topic: str) -> tuple[int, int]:
    await w.send(b"TOPICS\r\n")
    m = re.search(rb"(?:^|\n)%s: (\d+) (\d+)\r\n" % topic.encode(), (await w.reply()).split(b"\r\n", 1)[1])
    assert m is not None
    return int(m.group(1)), int(m.group(2))


async def read_everything(w: Wire, topic: str) -> tuple[dict[int, bytes], int]:
    """Every stored batch by offset (READs of up to 50000 messages), and the head."""
    first, head = await topic_range(w, topic)
    out: dict[int, bytes] = {}
    off = first
    while off < head:
        _, frames = await read_one(w, topic, off, 50_000)
        assert frames, off
        for f in frames:
            out[off] = f
            off += len(f)
    assert off == head
    return out, head


async def _writer(srv: ServerProcess, topic: str, tag: int, sent: set[bytes], acked: dict[int, bytes],
                  replies: list[bytes]) -> None:
    """Stream pipelined batches until the server goes; record sent frames, OKs and every reply line."""
    try:
        w = await Wire.connect(srv.host, srv.port)
    except OSError:
        return
    order: list[bytes] = []
    rng = random.Random(tag)

    async def sender() -> None:
        i = 0
        while True:
            reqs = [batch_request(topic, [b"w%d-%d " % (tag, i + k) + rng.randbytes(rng.randrange(300))])
                    for k in range(8)]
            i += 8
            order.extend(reqs)
            sent.update(reqs)
            try:
                await w.send(b"".join(reqs))
            except (OSError, trio.BrokenResourceError):
                return  # the server stopped reading: keep reading the replies it still sends
            await trio.lowlevel.checkpoint()

    with contextlib.suppress(EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        try:
            async with trio.open_nursery() as n:
                n.start_soon(sender)
                k = 0
                while True:
                    line = await w.reply()
                    replies.append(line)
                    if line.startswith(b"OK "):
                        acked[int(line.split()[1])] = order[k]
                    k += 1
        except* (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("fsync", ["always", "never"])
async def test_sigterm_under_load(nursery: trio.Nursery, tmp_path: Path, fsync: str) -> None:
    """SIGTERM while 4 writers stream: exit 0 within --shutdown-timeout; every acknowledged batch
    is there after a restart; every reply was OK; what is stored is only whole batches that were
    sent (in-flight requests completed or were not acknowledged); writing continues at the head."""
    workdir = tmp_path / "d"
    args = ["--fsync", fsync, "--shutdown-timeout", "3s", "--partition-size", "100000", "--partitions", "100000"]
    srv = await spawn(nursery, workdir, *args)
    sent: set[bytes] = set()
    acked: dict[int, bytes] = {}
    replies: list[bytes] = []
    async with trio.open_nursery() as n:
        for tag in range(4):
            n.start_soon(_writer, srv, "term", tag, sent, acked, replies)
        await trio.sleep(0.7)  # a real process under real load: real time
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            rc = await srv.proc.wait()
        elapsed = time.monotonic() - t0
    assert rc == 0, srv.log.decode(errors="replace")[-2000:]
    assert elapsed < 3 + 2, elapsed
    assert b"shut down cleanly" in srv.log
    assert len(acked) > 100
    assert all(r.startswith(b"OK ") for r in replies), {r for r in replies if not r.startswith(b"OK ")}
    srv = await spawn(nursery, workdir, *args)
    w = await Wire.connect(srv.host, srv.port)
    stored, head = await read_everything(w, "term")
    lost = [off for off, f in acked.items() if stored.get(off) != f]
    assert lost == [], f"{len(lost)} of {len(acked)} acknowledged batches lost"
    assert set(stored.values()) <= sent  # only whole batches that were sent
    assert len(stored) == len(acked)  # and every batch the server took in was answered before it exited
    print(f"SIGTERM fsync={fsync}: {len(acked)} acknowledged, {len(stored) - len(acked)} stored unacknowledged, "
          f"0 lost, exit after {elapsed:.2f}s")
    await w.send(batch_request("term", [b"after"]))
    assert await w.reply() == b"OK %d 1\r\n" % head
    srv.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        assert await srv.proc.wait() == 0


@pytest.mark.slow
async def test_repeated_sigkill_offsets_and_data(nursery: trio.Nursery, tmp_path: Path) -> None:
    """SIGKILL 5 times while 3 writers stream (small partitions, so kills land around rotations).
    After every restart: every batch acknowledged so far reads back byte-identical, the log is
    whole valid frames end to end, and the next write lands exactly at the head."""
    workdir = tmp_path / "d"
    args = ["--partition-size", "40000", "--partitions", "100000"]
    sent: set[bytes] = set()
    acked: dict[int, bytes] = {}
    rounds = 5
    for round_ in range(rounds + 1):
        srv = await spawn(nursery, workdir, *args)
        w = await Wire.connect(srv.host, srv.port)
        if acked:
            stored, head = await read_everything(w, "kill")
            lost = [off for off, f in acked.items() if stored.get(off) != f]
            assert lost == [], f"round {round_}: {len(lost)} of {len(acked)} acknowledged batches lost"
            assert set(stored.values()) <= sent
            last = max(stored)
            assert head == last + len(stored[last])  # writing continues right after the last stored batch
            marker = batch_request("kill", [b"restart %d" % round_])
            await w.send(marker)
            assert await w.reply() == b"OK %d 1\r\n" % head
            acked[head] = marker
            sent.add(marker)
        await w.aclose()
        if round_ == rounds:
            srv.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await srv.proc.wait() == 0
            break
        with trio.move_on_after(0.3 + 0.05 * round_):
            async with trio.open_nursery() as n:
                for tag in range(3):
                    n.start_soon(_writer, srv, "kill", round_ * 10 + tag, sent, acked, [])
        srv.proc.send_signal(signal.SIGKILL)
        await srv.proc.wait()
    print(f"SIGKILL x{rounds}: {len(acked)} acknowledged, 0 lost")
    assert len(acked) > 500


# ---------------------------------------------------------------- 7. resource limits


async def test_max_waiters_beyond_the_limit_answer_at_once(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    """--max-waiters: long-poll READs beyond the server-wide limit answer at once as a plain READ
    (``ERR not found`` at the head); the ones within it wait and get the next batch."""
    # fsync=never: acknowledging the wake-up batch must not wait on the disk while time is virtual
    srv = await start_server(nursery, make_config(tmp_path / "d", max_waiters=2, fsync="never"))
    conns = [await Wire.connect(srv.host, srv.port) for _ in range(4)]
    for c in conns[:2]:
        await c.send(b"READ default 0 1 20000\r\n")
    stats = conns[3]
    with trio.fail_after(5):
        while True:  # virtual time: wait until both polls are parked
            await stats.send(b"STATS\r\n")
            if b"\r\nlongpoll.waiting: 2\r\n" in await stats.reply():
                break
            await trio.sleep(0.01)
    t0 = trio.current_time()
    await conns[2].send(b"READ default 0 1 20000\r\n")
    assert await conns[2].reply() == b"ERR not found\r\n"  # over the limit: at once, not after 20 s
    assert trio.current_time() - t0 < 1
    req = batch_request("default", [b"wake"])
    await stats.send(req)
    assert await stats.reply() == b"OK 0 1\r\n"
    for c in conns[:2]:
        _, frames = await c.read_reply()
        assert frames == [req]
    # room again: a new long-poll waits (and times out after its wait, in virtual time)
    t0 = trio.current_time()
    await conns[2].send(b"READ default %d 1 3000\r\n" % len(req))
    assert await conns[2].reply() == b"ERR not found\r\n"
    assert trio.current_time() - t0 >= 3


def _rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    return rss, hwm


@pytest.mark.slow
async def test_clients_that_never_read_do_not_grow_server_memory(nursery: trio.Nursery, tmp_path: Path) -> None:
    """8 clients pipeline thousands of BATCH + READ requests and never read a reply: the server
    stops reading from them once ``pipeline_depth`` replies are pending (TCP pushes back), so its
    memory stays within a few MiB per connection; it closes them after --timeout and stays healthy."""
    srv = await spawn(nursery, tmp_path / "d", "--timeout", "2s", "--fsync", "never")
    w = await Wire.connect(srv.host, srv.port)
    big = [batch_request("t", [bytes([65 + i % 26]) * 16_000]) for i in range(100)]
    await w.send(b"".join(big))
    for _ in big:
        assert (await w.reply()).startswith(b"OK ")
    await w.send(b"TAIL t 50000\r\n")
    _, frames = await w.read_reply()
    assert frames == big
    base_rss, base_hwm = _rss_kib(srv.proc.pid)
    pushed = [0] * 8

    async def never_reads(i: int) -> None:
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            c = await Wire.connect(srv.host, srv.port)
            chunk = (batch_request("t", [b"n" * 16_000]) + b"READ t 0 50000\r\n") * 50
            with trio.move_on_after(3):
                for _ in range(40):  # up to 2000 batches and 2000 READs (~32 MB in, ~3 GB of replies)
                    await c.send(chunk)
                    pushed[i] += len(chunk)
            await c.aclose()

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(never_reads, i)
    rss, hwm = _rss_kib(srv.proc.pid)
    print(f"server RSS {base_rss} KiB before, {rss} KiB after (peak {hwm} KiB); "
          f"clients pushed {sum(pushed) >> 20} MiB")
    # depth 32 x 64 KiB per connection plus buffers; an unbounded server would hold ~all pushed
    assert hwm - base_hwm < 8 * 6 * 1024, (base_hwm, hwm)
    await w.send(b"PING\r\n")
    assert await w.reply() == b"PONG\r\n"
    await w.send(b"READ t 0 100\r\n")
    _, frames = await w.read_reply()
    assert frames == big
    srv.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        assert await srv.proc.wait() == 0


def test_limit_settings_parse_validate_and_reach_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """min_free_space / max_waiters / scrub_rate: defaults, size suffixes, env, rejection, CLI flags."""
    import logd_trio_cli.serve_cmd as serve_cmd
    from logd_trio_cli.main import app
    from typer.testing import CliRunner

    c = ServerConfig()
    assert (c.min_free_space, c.max_waiters, c.scrub_rate) == (16 << 20, 1024, 32 << 20)
    c = load_config(flags={"min_free_space": "1GiB", "scrub_rate": "0", "max_waiters": "7"}, env={})
    assert (c.min_free_space, c.max_waiters, c.scrub_rate) == (1 << 30, 7, 0)
    assert load_config(env={"LOGD_MIN_FREE_SPACE": "2m"}).min_free_space == 2 << 20
    for key in ("min_free_space", "max_waiters", "scrub_rate"):
        with pytest.raises(ConfigError, match=key):
            load_config(flags={key: "-1"}, env={})
        with pytest.raises(ConfigError, match=key):
            ServerConfig(**{key: -1})  # type: ignore[arg-type]
    seen: list[ServerConfig] = []

    async def fake_run(cfg: ServerConfig) -> None:  # the flags' destination, not the server under test
        seen.append(cfg)

    monkeypatch.setattr(serve_cmd, "run", fake_run)
    result = CliRunner().invoke(app, ["serve", "--min-free-space", "64MiB", "--max-waiters", "3",
                                      "--scrub-rate", "1MiB"])
    assert result.exit_code == 0, result.output
    assert (seen[0].min_free_space, seen[0].max_waiters, seen[0].scrub_rate) == (64 << 20, 3, 1 << 20)


# ---------------------------------------------------------------- index damage, files removed under the server


async def read_all_acked(w: Wire, topic: str, acked: dict[int, bytes]) -> dict[int, bytes]:
    """Each acknowledged offset read on its own: what the server answers for it."""
    got: dict[int, bytes] = {}
    for off in sorted(acked):
        reply, frames = await read_one(w, topic, off)
        got[off] = frames[0] if reply.startswith(b"OK ") and frames else reply
    return got


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "removed"])
async def test_index_damaged_under_a_running_server(nursery: trio.Nursery, tmp_path: Path, damage: str) -> None:
    """A sealed partition's index truncated, zeroed or removed while the server runs (a server
    process: a SIGBUS would kill pytest too): reads of that partition are answered from the
    log (the index is rebuilt), the server stays up, nothing is called corruption."""
    root = tmp_path / "d"
    offs, frames = fill_topic(root, "ix", 120, psize=3000)
    d = root / "ix"
    starts = partitions_of(d)
    assert len(starts) >= 4
    srv = await spawn(nursery, root, "--scrub-rate", "0", "--partition-size", "3000", "--partitions", "1000")
    w = await Wire.connect(srv.host, srv.port)
    victim = starts[1]
    inside = [k for k, o in enumerate(offs) if victim <= o < starts[2]]
    _, got = await read_one(w, "ix", offs[inside[0]])  # verified once, through the index
    assert got == [frames[inside[0]]]
    idx = d / f"{victim}.index"
    if damage == "truncated":
        os.truncate(idx, 16)
    elif damage == "zeroed":
        idx.write_bytes(b"\0" * idx.stat().st_size)
    else:
        idx.unlink()
    acked = {offs[k]: frames[k] for k in inside}
    assert await read_all_acked(w, "ix", acked) == acked
    _, got = await read_one(w, "ix", victim, 50_000)  # a long read across the partition
    assert got == [frames[k] for k, o in enumerate(offs) if o >= victim][: len(got)] and len(got) > len(inside)
    await w.send(b"PING\r\n")
    assert await w.reply() == b"PONG\r\n"
    assert srv.proc.returncode is None
    assert b"CORRUPTION" not in srv.log and not list(d.glob("*.corrupt-*"))
    srv.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        assert await srv.proc.wait() == 0


async def test_index_record_off_by_one_after_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    """One index record off by one byte in two sealed partitions (records a restart's sampling
    does not look at), the .log intact, restart: every acknowledged batch is readable and
    nothing is copied aside."""
    root = tmp_path / "d"
    cfg = make_config(root, partition_size=4000, partitions=1000, scrub_rate=0)
    srv = await start_server(nursery, cfg)
    w = await Wire.connect(srv.host, srv.port)
    rng = random.Random(4)
    acked: dict[int, bytes] = {}
    for i in range(150):
        req = batch_request("ob", [b"%d " % i + rng.randbytes(rng.randrange(20, 200))])
        await w.send(req)
        line = await w.reply()
        acked[int(line.split()[1])] = req
    await srv.stop()
    d = root / "ob"
    starts = partitions_of(d)
    assert len(starts) >= 3
    for start in starts[:2]:
        raw = bytearray((d / f"{start}.index").read_bytes())
        recs = records(raw)
        n = len(recs)
        sampled = {0, n - 1, *(n * j // 8 for j in range(1, 8))}  # the records a restart checks
        mid = next(k for k in range(n // 2, n) if k not in sampled and k + 1 not in sampled)
        put_end(raw, mid, recs[mid][0] + 1)
        (d / f"{start}.index").write_bytes(bytes(raw))
    srv = await start_server(nursery, cfg)
    w = await Wire.connect(srv.host, srv.port)
    assert await read_all_acked(w, "ob", acked) == acked
    assert not list(d.glob("*.corrupt-*"))
    await srv.stop()


@pytest.mark.parametrize("removal", ["data-dir", "head-partition"])
async def test_files_removed_under_the_server_are_never_acknowledged_into(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, removal: str
) -> None:
    """``rm -rf`` of the data directory, or an unlinked head partition, while the server runs
    (--fsync always): the next BATCH is refused with a clear ERR (no path in it), a loud log line
    names the file, and the topic stays read-only: no batch is acknowledged into a file that is gone."""
    root = tmp_path / "d"
    srv = await start_server(nursery, make_config(root, fsync="always"))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("rm", [b"before"]))
    assert await w.reply() == b"OK 0 1\r\n"
    if removal == "data-dir":
        import shutil

        shutil.rmtree(root)
    else:
        (root / "rm" / "0.log").unlink()
    await w.send(batch_request("rm", [b"into the void"]))
    reply = await w.reply()
    assert reply.startswith(b"ERR storage error: partition file 0.log was removed or replaced"), reply
    assert str(root).encode() not in reply
    for _ in range(3):
        await w.send(batch_request("rm", [b"later"]))
        assert b"read-only" in await w.reply()
    assert any(r.levelno == logging.CRITICAL and "REMOVED OR REPLACED" in r.getMessage()
               and str(root / "rm" / "0.log") in r.getMessage() for r in caplog.records)
    await w.send(b"READ rm 0 10\r\n")  # what was acknowledged before is still served (open fds)
    _, frames = await w.read_reply()
    assert frames == [batch_request("rm", [b"before"])]
    await srv.stop()


async def test_slow_disk_reaches_spawned_server_processes(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--slow-disk`` (harness.SLOW_DISK) reaches a spawned server through LOGD_TEST_SLOW_DISK:
    with --fsync always an OK takes at least the injected delay (a lower bound only: a fast
    disk cannot make this fail, a slow one only makes it pass more surely)."""
    monkeypatch.setattr(harness, "SLOW_DISK", "400ms")
    srv = await spawn(nursery, tmp_path / "d", "--fsync", "always")
    w = await Wire.connect(srv.host, srv.port)
    t0 = time.monotonic()
    await w.send(batch_request("sd", [b"x"]))
    assert (await w.reply()).startswith(b"OK ")
    assert time.monotonic() - t0 >= 0.4
    await w.aclose()
    srv.proc.terminate()
    await srv.proc.wait()


def test_slow_disk_variable_is_checked(tmp_path: Path) -> None:
    """A bad LOGD_TEST_SLOW_DISK stops the server process with an error naming the variable."""
    env = dict(os.environ, LOGD_TEST_SLOW_DISK="fast")
    r = subprocess.run([sys.executable, "-c", "import logd_trio.server.storage.syscalls"], env=env,
                       capture_output=True, timeout=60)
    assert r.returncode != 0 and b"LOGD_TEST_SLOW_DISK: 'fast' is not a delay" in r.stderr
