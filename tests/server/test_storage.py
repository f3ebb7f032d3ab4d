"""Storage: partitions, rotation, retention, index, recovery, sync jobs, read plans (no trio)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logd_trio.core.errors import NotFound, StorageError
from logd_trio.core.framing import build_body, build_frame
from logd_trio.server.storage import recovery, syscalls
from logd_trio.server.storage.files import list_topics
from logd_trio.server.storage.index import HEADER, HEADER_SIZE, REC_SIZE, REC_V2, PartitionIndex
from logd_trio.server.storage.reads import CorruptData, ReadPlan
from logd_trio.server.storage.recovery import Recovery
from logd_trio.server.storage.topic_log import TopicLog

from .index_files import layout, records

TOPIC = "t"


def frame_of_len(length: int, seed: int = 0, topic: str = TOPIC) -> bytes:
    """A valid one-message frame of exactly ``length`` bytes (content varies with ``seed``).

    The length is solved for, not searched: a one-message frame is the BATCH line
    (whose size and CRC fields are decimal) plus ``MSG <m>\\r\\n<m bytes>\\r\\n``.
    For each CRC width (10 digits for most CRCs) the message size ``m`` follows from
    the target; only the fill byte is then varied until the CRC has that width.
    """
    for crc_digits in (10, 9, 8):
        for m in range(max(0, length - 40 - len(topic)), length):
            body = len(f"MSG {m}\r\n") + m + 2
            line = len(f"BATCH {body} {topic} ") + crc_digits + len(" 1\r\n")
            if line + body > length:
                break
            if line + body < length:
                continue
            for fill in range(seed, seed + 256):
                f = build_frame(topic, build_body([bytes([fill % 256]) * m]), 1)
                if len(f) == length:
                    return f
    raise ValueError(f"no frame of length {length}")


def multi_frame(sizes: list[int], seed: int = 0) -> tuple[bytes, int]:
    msgs = [bytes([(seed + i) % 256]) * s for i, s in enumerate(sizes)]
    return build_frame(TOPIC, build_body(msgs), len(msgs)), len(msgs)


def plan_bytes(plan: ReadPlan) -> bytes:
    return b"".join(os.pread(fd, length, pos) for fd, pos, length in plan.segments)


def read_all(tl: TopicLog) -> bytes:
    if tl.first == tl.head:
        return b""
    with tl.read_plan(tl.first, 10**12) as plan:
        return plan_bytes(plan)


def open_log(root: Path, partition_size: int = 1 << 20, partitions: int = 100) -> TopicLog:
    return TopicLog.open(root, TOPIC, partition_size=partition_size, partitions=partitions)


def settle(tl: TopicLog) -> None:
    """What the server does once every batch is acknowledged: retention runs, its files go."""
    tl.acknowledge(tl.head)
    job = tl.remove_job()
    if job is not None:
        job.run()


def logs(root: Path) -> list[str]:
    return sorted((p.name for p in (root / TOPIC).glob("*.log")), key=lambda n: int(n.split(".")[0]))


@pytest.fixture(params=["verify-window", "trust-index"])
def verify_tail(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with the default head re-verify window and with none (so the index path is exercised)."""
    if request.param == "trust-index":
        monkeypatch.setattr(recovery, "VERIFY_TAIL", 0)
    yield


class NoSync(syscalls.Layer):
    """fsync and fdatasync do nothing: for tests about file contents within one boot, where
    durability is not the point (they then cost no time under ``--slow-disk`` either)."""

    def fsync(self, fd: int) -> None:
        pass

    def fdatasync(self, fd: int) -> None:
        pass


@pytest.fixture
def no_sync() -> Iterator[None]:
    with syscalls.install(NoSync()):
        yield


F55 = frame_of_len(55)


# ---------------------------------------------------------------- append, rotation, read plans


def test_conformance_rotation(tmp_path: Path) -> None:
    tl = TopicLog.open(tmp_path, TOPIC, partition_size=247, partitions=3)
    offsets = [tl.append(frame_of_len(55, i), 1) for i in range(12)]
    assert offsets == [55 * i for i in range(12)]
    assert logs(tmp_path) == ["0.log", "220.log", "440.log"]
    assert (tmp_path / TOPIC / "0.log").stat().st_size == 220
    assert tl.first == 0
    assert tl.append(frame_of_len(55, 12), 1) == 660
    assert logs(tmp_path) == ["0.log", "220.log", "440.log", "660.log"]
    assert tl.first == 0  # nothing is acknowledged yet: retention waits
    settle(tl)
    assert logs(tmp_path) == ["220.log", "440.log", "660.log"]
    assert not (tmp_path / TOPIC / "0.index").exists()
    assert tl.first == 220 and tl.head == 715
    for off in (0, 55, 165, 200, 715, 800):
        with pytest.raises(NotFound):
            tl.read_plan(off, 1)
    with tl.read_plan(385, 3) as plan:
        assert (plan.nbatches, plan.nmessages, plan.nbytes) == (3, 3, 165)
        assert len(plan.segments) == 2
        assert plan_bytes(plan) == b"".join(frame_of_len(55, i) for i in (7, 8, 9))
    with tl.read_plan(220, 50000) as plan:
        assert plan.nbatches == 9 and len(plan.segments) == 3
        assert plan_bytes(plan) == b"".join(frame_of_len(55, i) for i in range(4, 13))
    tl.close()
    tl = TopicLog.open(tmp_path, TOPIC, partition_size=247, partitions=3)
    assert (tl.first, tl.head) == (220, 715)
    assert tl.append(F55, 1) == 715
    tl.close()


def test_read_plan_limits(tmp_path: Path) -> None:
    tl = open_log(tmp_path)
    counts = [3, 1, 4, 1, 5, 9, 2, 6]
    frames = [multi_frame([7] * c, i) for i, c in enumerate(counts)]
    offs = []
    for i, (f, c) in enumerate(frames):
        offs.append(tl.append(f, c))
        if i == 3:  # records 0..3 in the index file, the rest pending in memory
            job = tl.sync_job()
            assert job is not None
            job.run()
    for start in range(len(counts)):
        for limit in range(0, 35):
            with tl.read_plan(offs[start], limit) as plan:
                k, total = start, counts[start]
                while total < limit and k + 1 < len(counts):
                    k += 1
                    total += counts[k]
                assert plan.nbatches == k - start + 1
                assert plan.nmessages == total
                assert plan.offset == offs[start]
                assert plan_bytes(plan) == b"".join(f for f, _ in frames[start : k + 1])
                assert plan.nbytes == len(plan_bytes(plan))
    for bad in (1, offs[1] - 1, offs[2] + 5, tl.head, tl.head + 1, -1):
        with pytest.raises(NotFound):
            tl.read_plan(bad, 10)
    tl.close()


def test_empty_topic(tmp_path: Path) -> None:
    tl = open_log(tmp_path)
    assert (tl.first, tl.head) == (0, 0)
    with pytest.raises(NotFound):
        tl.read_plan(0, 1)
    assert tl.sync_job() is not None  # the new 0.log's directory entry
    assert tl.sync_job() is None
    tl.close()
    tl.close()
    assert list_topics(tmp_path) == [TOPIC]


@pytest.mark.parametrize(
    ("psize", "per_file"),
    [(110, 1), (111, 2), (165, 2), (166, 3), (10, 1), (55, 1), (56, 1)],
)
def test_rotation_boundary(tmp_path: Path, psize: int, per_file: int) -> None:
    tl = open_log(tmp_path, partition_size=psize)
    for i in range(6):
        assert tl.append(frame_of_len(55, i), 1) == 55 * i
    names = logs(tmp_path)
    assert names == [f"{55 * per_file * j}.log" for j in range((6 + per_file - 1) // per_file)]
    for name in names:
        assert (tmp_path / TOPIC / name).stat().st_size <= 55 * per_file
    assert read_all(tl) == b"".join(frame_of_len(55, i) for i in range(6))
    tl.close()


def test_retention_and_offsets_not_reused(tmp_path: Path) -> None:
    tl = open_log(tmp_path, partition_size=100, partitions=2)
    offs = [tl.append(frame_of_len(55, i), 1) for i in range(5)]
    settle(tl)
    assert logs(tmp_path) == ["165.log", "220.log"]
    assert tl.first == 165
    for off in offs[:3]:
        with pytest.raises(NotFound):
            tl.read_plan(off, 1)
    tl.close()
    tl = open_log(tmp_path, partition_size=100, partitions=2)
    assert (tl.first, tl.head) == (165, 275)
    assert tl.append(F55, 1) == 275
    settle(tl)
    assert logs(tmp_path) == ["220.log", "275.log"]
    with pytest.raises(NotFound):
        tl.read_plan(165, 1)
    tl.close()


def test_memoryview_frames(tmp_path: Path) -> None:
    tl = open_log(tmp_path)
    buf = bytearray(b"junk" + F55 + b"junk")
    assert tl.append(memoryview(buf)[4:59], 1) == 0
    assert tl.head == 55
    assert read_all(tl) == F55
    tl.close()


def test_plan_survives_retention(tmp_path: Path) -> None:
    tl = open_log(tmp_path, partition_size=100, partitions=1)
    tl.append(frame_of_len(55, 1), 1)
    plan = tl.read_plan(0, 1)
    tl.append(frame_of_len(55, 2), 1)
    settle(tl)
    assert logs(tmp_path) == ["55.log"]
    assert plan_bytes(plan) == frame_of_len(55, 1)
    fds = [fd for fd, _, _ in plan.segments]
    plan.close()
    plan.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    tl.close()


# ---------------------------------------------------------------- sync jobs


def test_sync_jobs(tmp_path: Path) -> None:
    tl = open_log(tmp_path, partition_size=120, partitions=2)
    seen: list[int] = []
    tl.on_fsync = seen.append
    job = tl.sync_job()
    assert job is not None and job.upto == 0
    job.run()
    assert tl.sync_job() is None
    tl.append(F55, 1)
    job = tl.sync_job()
    assert job is not None and job.upto == 55
    with syscalls.install(SyncRecorder()) as rec:
        job.run()
        job.run()  # idempotent
    assert rec.calls and not any(is_dir for _, is_dir in rec.calls)  # no partition created: no directory fsync
    assert len(rec.calls) == len({fd for fd, _ in rec.calls})  # each file once
    for fd, _ in rec.calls:  # the job's duplicates are closed once it ran
        with pytest.raises(OSError) as ei:
            os.fstat(fd)
        assert ei.value.errno == errno.EBADF
    assert seen == [0, 55] and tl.fsync_count == 2
    # A job captured before retention deletes its partitions still runs.
    tl.append(F55, 1)
    tl.append(F55, 1)  # rotates: 110.log
    job = tl.sync_job()
    assert job is not None and job.upto == 165
    for _ in range(4):
        tl.append(F55, 1)
    settle(tl)
    assert logs(tmp_path) == ["220.log", "330.log"]
    with syscalls.install(SyncRecorder()) as rec:
        job.run()
    assert any(is_dir for _, is_dir in rec.calls)  # a partition was created: the directory too
    assert seen[-1] == 165
    dropped = tl.sync_job()
    assert dropped is not None
    dropped.close()
    dropped.close()
    tl.close()
    assert tl.fsync_count == 4  # the close() sync ran too


def test_sync_job_in_thread_while_appending(tmp_path: Path) -> None:
    tl = open_log(tmp_path, partition_size=300, partitions=3)
    expected = b""
    for round_ in range(30):
        job = tl.sync_job()
        t = threading.Thread(target=job.run) if job is not None else None
        if t is not None:
            t.start()
        for i in range(5):
            f = frame_of_len(55, round_ * 5 + i)
            off = tl.append(f, 1)
            expected = (expected + f) if off >= tl.first else expected
        if t is not None:
            t.join()
    tl.close()
    tl = open_log(tmp_path, partition_size=300, partitions=3)
    assert read_all(tl) == expected[len(expected) - (tl.head - tl.first) :]
    tl.close()


# ---------------------------------------------------------------- ENOSPC


def is_log(fd: int) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}").endswith(".log")


class _FailingPwrite(syscalls.Layer):
    """The first partition write comes up short, every later one fails with ENOSPC."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, pos: int) -> int:
        if not is_log(fd):
            return self.inner.pwrite(fd, data, pos)
        self.calls.append(len(data))
        if len(self.calls) == 1:
            return self.inner.pwrite(fd, bytes(data)[: len(data) // 2], pos)
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("rotate", [False, True])
def test_enospc_leaves_no_partial_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rotate: bool
) -> None:
    tl = open_log(tmp_path, partition_size=100 if rotate else 1000)
    tl.append(F55, 1)
    before = sorted(os.listdir(tmp_path / TOPIC))
    with syscalls.install(_FailingPwrite()) as failing, pytest.raises(StorageError) as ei:
        tl.append(frame_of_len(60, 1), 1)
    assert isinstance(ei.value.__cause__, OSError) and ei.value.__cause__.errno == errno.ENOSPC
    assert len(failing.calls) == 2
    assert tl.head == 55
    assert sorted(os.listdir(tmp_path / TOPIC)) == before
    assert (tmp_path / TOPIC / "0.log").stat().st_size == 55
    assert tl.append(frame_of_len(60, 2), 1) == 55
    assert read_all(tl) == F55 + frame_of_len(60, 2)
    tl.close()
    tl = open_log(tmp_path, partition_size=100 if rotate else 1000)
    assert tl.head == 115 and read_all(tl) == F55 + frame_of_len(60, 2)
    tl.close()


# ---------------------------------------------------------------- reopen and the index


def _write_sample(root: Path, n: int = 40, psize: int = 600) -> tuple[list[int], list[bytes]]:
    tl = open_log(root, partition_size=psize)
    frames = [multi_frame([i % 7 + 1] * (i % 3 + 1), i)[0] for i in range(n)]
    offs = [tl.append(f, i % 3 + 1) for i, f in enumerate(frames)]
    tl.close()
    return offs, frames


def _check_sample(root: Path, offs: list[int], frames: list[bytes], psize: int = 600) -> TopicLog:
    tl = open_log(root, partition_size=psize)
    assert tl.head == offs[-1] + len(frames[-1])
    assert read_all(tl) == b"".join(frames)
    for off, f in zip(offs, frames, strict=True):
        with tl.read_plan(off, 1) as plan:
            assert plan_bytes(plan) == f
    return tl


def test_reopen_with_index(tmp_path: Path, verify_tail: None) -> None:
    offs, frames = _write_sample(tmp_path)
    assert len(logs(tmp_path)) > 3
    idx_before = {p.name: p.read_bytes() for p in (tmp_path / TOPIC).glob("*.index")}
    _check_sample(tmp_path, offs, frames).close()
    idx_after = {p.name: p.read_bytes() for p in (tmp_path / TOPIC).glob("*.index")}
    assert idx_after == idx_before
    assert not list((tmp_path / TOPIC).glob("*corrupt*"))


def _same_records(before: list[tuple[int, int, int | None]], after: list[tuple[int, int, int | None]]) -> None:
    """The records of a rescanned index: the same batches; times unknown to the scan are an upper
    bound of the real ones (never earlier), and never decrease."""
    assert [(e, c) for e, c, _ in after] == [(e, c) for e, c, _ in before]
    times = [t for _, _, t in after]
    assert all(t is not None and b is not None and t >= b for t, (_, _, b) in zip(times, before, strict=True))
    assert times == sorted(times)  # type: ignore[type-var]


def test_reopen_without_index(tmp_path: Path, verify_tail: None) -> None:
    offs, frames = _write_sample(tmp_path)
    idx = {p.name: records(p.read_bytes()) for p in (tmp_path / TOPIC).glob("*.index")}
    for p in (tmp_path / TOPIC).glob("*.index"):
        p.unlink()
    _check_sample(tmp_path, offs, frames).close()
    after = {p.name: records(p.read_bytes()) for p in (tmp_path / TOPIC).glob("*.index")}  # rebuilt
    assert after.keys() == idx.keys()
    for name in idx:
        _same_records(idx[name], after[name])


# v2: a 16-byte header, then 24-byte records (end, cum, time): cuts in the header, in a record's
# position or count, and in its time only (-8: the last record lost just its time).
@pytest.mark.parametrize("cut", [0, 1, 7, 15, 16, 17, 32, 39, 40, 41, 65, -1, -8, -9, -16, -23, -24, -25])
def test_reopen_with_truncated_index(tmp_path: Path, verify_tail: None, cut: int) -> None:
    offs, frames = _write_sample(tmp_path)
    before = {}
    for p in (tmp_path / TOPIC).glob("*.index"):
        data = p.read_bytes()
        before[p.name] = records(data)
        p.write_bytes(data[:cut])
    _check_sample(tmp_path, offs, frames).close()
    for p in (tmp_path / TOPIC).glob("*.index"):
        data = p.read_bytes()
        assert data.startswith(HEADER)
        after = records(data)
        _same_records(before[p.name], after)
        size = len(before[p.name]) * REC_V2.size + HEADER_SIZE
        kept = max(0, (size + cut if cut < 0 else min(cut, size)) - HEADER_SIZE) // REC_V2.size
        assert after[:kept] == before[p.name][:kept]  # the whole records left keep their times


def test_reopen_with_stale_index(tmp_path: Path, verify_tail: None) -> None:
    """The index covers less than the log (crash before the index was written)."""
    offs, frames = _write_sample(tmp_path, psize=10**6)
    ipath = tmp_path / TOPIC / "0.index"
    full = ipath.read_bytes()
    base, rs = layout(full)
    ipath.write_bytes(full[: base + rs * 10])
    _check_sample(tmp_path, offs, frames, psize=10**6).close()
    after = ipath.read_bytes()
    assert after[: base + rs * 10] == full[: base + rs * 10]  # the records it had are kept as they were
    _same_records(records(full), records(after))


@pytest.mark.parametrize("how", ["log-cut", "junk-records", "zero-records", "middle-garbage"])
def test_reopen_with_index_claiming_more(tmp_path: Path, verify_tail: None, how: str) -> None:
    offs, frames = _write_sample(tmp_path, psize=10**6)
    lpath, ipath = tmp_path / TOPIC / "0.log", tmp_path / TOPIC / "0.index"
    if how == "log-cut":  # the log lost its last 5 frames but the index kept them
        keep = offs[-5]
        lpath.write_bytes(lpath.read_bytes()[:keep])
        offs, frames = offs[:-5], frames[:-5]
    elif how == "junk-records":
        ipath.write_bytes(ipath.read_bytes() + os.urandom(REC_SIZE * 3))
    elif how == "zero-records":
        ipath.write_bytes(ipath.read_bytes() + bytes(REC_SIZE * 5))
    else:  # a bad record in the middle: the index is garbage and rebuilt
        data = bytearray(ipath.read_bytes())
        base, rs = layout(data)
        mid = base + (len(data) - base) // rs // 2 * rs
        data[mid : mid + rs] = bytes(rs)
        ipath.write_bytes(bytes(data))
    _check_sample(tmp_path, offs, frames, psize=10**6).close()
    assert not list((tmp_path / TOPIC).glob("*corrupt*"))


def test_sealed_partition_index_mismatch(tmp_path: Path) -> None:
    """A sealed partition's index from other content (same length pattern broken) is detected."""
    offs, frames = _write_sample(tmp_path)
    ipath = tmp_path / TOPIC / "0.index"
    data = bytearray(ipath.read_bytes())
    rs = layout(data)[1]
    data[-rs : -rs + 16] = (10**9).to_bytes(8, "little") + (10**9).to_bytes(8, "little")
    ipath.write_bytes(bytes(data))
    _check_sample(tmp_path, offs, frames).close()


# ---------------------------------------------------------------- recovery


@pytest.mark.parametrize("delete_index", [False, True])
def test_torn_last_frame_at_every_byte(
    tmp_path: Path, verify_tail: None, delete_index: bool, caplog: pytest.LogCaptureFixture, no_sync: None
) -> None:
    src = tmp_path / "src"
    offs, frames = _write_sample(src, n=8, psize=10**6)
    log_bytes = (src / TOPIC / "0.log").read_bytes()
    idx_bytes = (src / TOPIC / "0.index").read_bytes()
    last = offs[-1]
    for keep in range(last, len(log_bytes)):
        root = tmp_path / f"r{keep}"
        (root / TOPIC).mkdir(parents=True)
        (root / TOPIC / "0.log").write_bytes(log_bytes[:keep])
        if not delete_index:
            (root / TOPIC / "0.index").write_bytes(idx_bytes)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            tl = open_log(root, partition_size=10**6)
        assert tl.head == last
        assert read_all(tl) == b"".join(frames[:-1])
        assert (root / TOPIC / "0.log").stat().st_size == last
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        if keep > last:
            assert any("torn tail" in r.getMessage() for r in caplog.records)
        assert not list((root / TOPIC).glob("*corrupt*"))
        assert tl.append(frames[-1], 3) == last
        tl.close()
        shutil.rmtree(root)


@pytest.mark.parametrize("where", ["body", "header", "crc-digit"])
def test_corruption_in_middle_is_copied_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    offs, frames = _write_sample(tmp_path, n=12, psize=10**6)
    lpath = tmp_path / TOPIC / "0.log"
    data = bytearray(lpath.read_bytes())
    bad = offs[4]
    crc_digit = bad + frames[4].split(b"\r\n")[0].rindex(b" ") - 1
    at = {"body": bad + len(frames[4]) - 3, "header": bad + 1, "crc-digit": crc_digit}[where]
    if where == "crc-digit":  # still a well-formed header, but the CRC no longer matches
        data[at] = ord("1") if data[at] == ord("0") else ord("0")
    else:
        data[at] ^= 1
    lpath.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        tl = open_log(tmp_path, partition_size=10**6)
    # The damaged batch is withheld; the valid ones after it stay (they were acknowledged).
    assert tl.head == len(data)
    assert read_all(tl) == b"".join(frames[:4])  # a read stops before the damage
    with pytest.raises(CorruptData):
        tl.read_plan(bad, 1)
    with tl.read_plan(offs[5], 10**6) as plan:
        assert plan_bytes(plan) == b"".join(frames[5:])
    copies = list((tmp_path / TOPIC).glob("0.log.corrupt-*"))
    assert len(copies) == 1 and copies[0].name.startswith(f"0.log.corrupt-{bad}-")
    assert copies[0].read_bytes() == bytes(data[bad : offs[5]])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(copies[0]) in errors[0]
    assert tl.append(frames[4], 3) == len(data)
    tl.close()
    tl = open_log(tmp_path, partition_size=10**6)  # the copy is not a stray warning nor a partition
    assert tl.head == len(data) + len(frames[4])
    assert len(list((tmp_path / TOPIC).glob("0.log.corrupt-*"))) == 1  # not copied twice
    with pytest.raises(CorruptData):
        tl.read_plan(bad, 1)
    tl.close()


def test_garbage_tail_without_valid_frames_is_torn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    offs, frames = _write_sample(tmp_path, n=5, psize=10**6)
    lpath = tmp_path / TOPIC / "0.log"
    with lpath.open("ab") as f:
        f.write(b"\0" * 4096 + b"BATCH 5 t 1 1\r\nxx")
    with caplog.at_level(logging.WARNING):
        tl = open_log(tmp_path, partition_size=10**6)
    assert tl.head == lpath.stat().st_size == offs[-1] + len(frames[-1])
    assert not list((tmp_path / TOPIC).glob("*corrupt*"))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    tl.close()


def test_sealed_partition_bad_tail_is_copied(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    offs, frames = _write_sample(tmp_path)
    names = logs(tmp_path)
    first_len = (tmp_path / TOPIC / names[0]).stat().st_size
    lpath = tmp_path / TOPIC / names[0]
    data = lpath.read_bytes()
    cut = [o for o in offs if o < first_len][-1]
    lpath.write_bytes(data[:-3])  # a torn frame in a sealed partition: the next partition exists
    (tmp_path / TOPIC / "0.index").unlink()
    with caplog.at_level(logging.WARNING):
        tl = open_log(tmp_path, partition_size=600)
    copies = list((tmp_path / TOPIC).glob("0.log.corrupt-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == data[cut:-3]
    assert tl.first == 0
    assert read_all(tl) == data[:cut]  # a read stops at the gap
    nxt = int(names[1].split(".")[0])
    with tl.read_plan(nxt, 10**9) as plan:
        assert plan_bytes(plan) == b"".join(f for o, f in zip(offs, frames, strict=True) if o >= nxt)
    with pytest.raises(NotFound):
        tl.read_plan(cut, 1)
    tl.close()


def test_go_data_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / TOPIC
    d.mkdir()
    a = [frame_of_len(60, i) for i in range(5)]
    b = [frame_of_len(57, i) for i in range(3)]
    (d / "0.log").write_bytes(b"".join(a))
    (d / "300.log").write_bytes(b"".join(b))
    junk = bytes(range(200))
    (d / "0.idx").write_bytes(junk)
    (d / "300.idx").write_bytes(junk[:7])
    (d / "notes.txt").write_text("hi")
    (d / "0012.log").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        tl = TopicLog.open(tmp_path, TOPIC, partition_size=4096, partitions=10)
    assert {"notes.txt", "0012.log"} <= {n for r in caplog.records for n in ("notes.txt", "0012.log")
                                         if n in r.getMessage()}
    assert (tl.first, tl.head) == (0, 300 + 3 * 57)
    assert read_all(tl) == b"".join(a + b)
    with tl.read_plan(240, 2) as plan:
        assert plan.nbatches == 2 and plan_bytes(plan) == a[4] + b[0]
    assert tl.append(F55, 1) == 471
    tl.close()
    assert (d / "0.idx").read_bytes() == junk and (d / "300.idx").read_bytes() == junk[:7]
    assert (d / "notes.txt").exists() and (d / "0012.log").exists()
    tl = TopicLog.open(tmp_path, TOPIC, partition_size=4096, partitions=10)
    assert read_all(tl) == b"".join([*a, *b, F55])
    tl.close()


def test_empty_partitions(tmp_path: Path) -> None:
    d = tmp_path / TOPIC
    d.mkdir()
    (d / "0.log").write_bytes(F55)
    (d / "55.log").write_bytes(b"")
    (d / "100.log").write_bytes(frame_of_len(60, 3))
    (d / "160.log").write_bytes(b"")
    (d / "77.index").write_bytes(b"orphan")
    tl = open_log(tmp_path)
    assert logs(tmp_path) == ["0.log", "100.log", "160.log"]
    assert not (d / "77.index").exists()
    assert (tl.first, tl.head) == (0, 160)
    assert tl.append(F55, 1) == 160
    tl.close()


def test_overlapping_partitions(tmp_path: Path) -> None:
    d = tmp_path / TOPIC
    d.mkdir()
    (d / "0.log").write_bytes(F55 * 3)
    (d / "110.log").write_bytes(frame_of_len(55, 9))
    tl = open_log(tmp_path)
    assert (d / "0.log").stat().st_size == 110
    assert [c.read_bytes() for c in d.glob("0.log.corrupt-110-*")] == [F55]
    assert read_all(tl) == F55 * 2 + frame_of_len(55, 9)
    tl.close()


def test_modes_and_invalid_args(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        tl = TopicLog.open(tmp_path / "root", TOPIC, partition_size=100, partitions=2, file_mode=0o640,
                           dir_mode=0o750)
        tl.append(F55, 1)
        tl.append(F55, 1)
        tl.close()
    finally:
        os.umask(old)
    assert (tmp_path / "root" / TOPIC).stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "root" / TOPIC / "55.log").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "root" / TOPIC / "55.index").stat().st_mode & 0o777 == 0o640
    for bad in ("..", "a/b", "", "x" * 256):
        with pytest.raises(ValueError):
            TopicLog.open(tmp_path, bad, partition_size=100, partitions=2)
    with pytest.raises(ValueError):
        TopicLog.open(tmp_path, TOPIC, partition_size=0, partitions=2)
    (tmp_path / "root" / "not a topic").mkdir()
    (tmp_path / "root" / "file").write_text("")
    assert list_topics(tmp_path / "root") == [TOPIC]
    assert list_topics(tmp_path / "missing") == []
    closed = TopicLog.open(tmp_path, TOPIC, partition_size=100, partitions=2)
    closed.close()
    with pytest.raises(StorageError):
        closed.append(F55, 1)


# ---------------------------------------------------------------- property test


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(st.lists(st.integers(0, 90), min_size=1, max_size=4), min_size=1, max_size=40),
    psize=st.integers(1, 700),
    partitions=st.integers(1, 6),
    reopen_every=st.integers(1, 50),
    sync_every=st.integers(1, 10),
    damage=st.sampled_from(["none", "delete-index", "truncate-index"]),
)
def test_roundtrip_property(
    tmp_path_factory: pytest.TempPathFactory,
    no_sync: None,
    batches: list[list[int]],
    psize: int,
    partitions: int,
    reopen_every: int,
    sync_every: int,
    damage: str,
) -> None:
    root = tmp_path_factory.mktemp("prop")
    written: list[tuple[int, bytes]] = []
    tl = TopicLog.open(root, TOPIC, partition_size=psize, partitions=partitions)
    for i, sizes in enumerate(batches):
        frame, n = multi_frame(sizes, i)
        off = tl.append(frame, n)
        assert off == (written[-1][0] + len(written[-1][1]) if written else 0)
        written.append((off, frame))
        if (i + 1) % sync_every == 0:
            job = tl.sync_job()
            if job is not None:
                job.run()
        if (i + 1) % reopen_every == 0:
            settle(tl)
            tl.close()
            tl = TopicLog.open(root, TOPIC, partition_size=psize, partitions=partitions)
    settle(tl)
    # Before reopening: index records partly in files (pread / mmap), partly pending.
    live = [(o, f) for o, f in written if o >= tl.first]
    assert read_all(tl) == b"".join(f for _, f in live)
    for o, f in live:
        with tl.read_plan(o, 1) as plan:
            assert plan_bytes(plan) == f
    tl.close()
    for p in (root / TOPIC).glob("*.index"):
        if damage == "delete-index":
            p.unlink()
        elif damage == "truncate-index":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2 + 5])
    tl = TopicLog.open(root, TOPIC, partition_size=psize, partitions=partitions)
    assert tl.head == written[-1][0] + len(written[-1][1])
    assert len(logs(root)) <= partitions
    kept = [(o, f) for o, f in written if o >= tl.first]
    assert kept and kept[-1] == written[-1]
    assert read_all(tl) == b"".join(f for _, f in kept)
    for o, f in reversed(kept):  # (forward order above mostly hits the read hints; this searches)
        with tl.read_plan(o, 1) as plan:
            assert plan_bytes(plan) == f
    for o, _ in written:
        if o < tl.first:
            with pytest.raises(NotFound):
                tl.read_plan(o, 1)
    tl.close()
    assert not list((root / TOPIC).glob("*corrupt*"))


def test_clean_reopen_scans_only_the_verify_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offs, frames = _write_sample(tmp_path, n=200, psize=2000)
    scanned: list[tuple[int, int]] = []
    real = Recovery._scan

    def spy(self: Recovery, fd: int, idx: PartitionIndex, pos: int, stop: int, cum: int) -> tuple[int, int]:
        scanned.append((pos, stop))
        return real(self, fd, idx, pos, stop, cum)

    monkeypatch.setattr(Recovery, "_scan", spy)
    monkeypatch.setattr(recovery, "VERIFY_TAIL", 0)
    _check_sample(tmp_path, offs, frames, psize=2000).close()
    assert len(scanned) == len(logs(tmp_path)) > 3
    assert all(pos == stop for pos, stop in scanned)  # nothing rescanned at all
    scanned.clear()
    monkeypatch.setattr(recovery, "VERIFY_TAIL", 100)
    _check_sample(tmp_path, offs, frames, psize=2000).close()
    assert all(pos == stop for pos, stop in scanned[:-1])  # sealed partitions: not scanned
    pos, stop = scanned[-1]
    assert stop > 200 and 100 <= stop - pos < 100 + max(len(f) for f in frames)  # head: only the window


@pytest.mark.parametrize("psize", [1 << 20, 120])
def test_read_plan_end_hides_later_batches(tmp_path: Path, psize: int) -> None:
    """``end`` (the server's acknowledged head) hides batches at and after it."""
    tl = open_log(tmp_path, partition_size=psize)
    frames = [frame_of_len(50, seed=i) for i in range(6)]
    offs = [tl.append(f, 1) for f in frames]
    with tl.read_plan(0, 100, end=offs[3]) as plan:
        assert plan.nbatches == 3
        assert plan_bytes(plan) == b"".join(frames[:3])
    with tl.read_plan(offs[2], 1, end=offs[3]) as plan:
        assert plan_bytes(plan) == frames[2]
    with pytest.raises(NotFound):
        tl.read_plan(offs[3], 1, end=offs[3])
    with tl.read_plan(offs[1], 100, end=tl.head) as plan:
        assert plan_bytes(plan) == b"".join(frames[1:])
    tl.close()


def test_long_rescan_logs_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture, no_sync: None) -> None:
    monkeypatch.setattr(recovery, "PROGRESS_BYTES", 4096)
    tl = open_log(tmp_path)
    for i in range(400):
        tl.append(frame_of_len(100, seed=i), 1)
    tl.close()
    for p in (tmp_path / TOPIC).glob("*.index"):
        p.unlink()  # no index: the whole partition is rescanned
    monkeypatch.setattr(recovery, "SCAN_CHUNK", 1024)
    with caplog.at_level(logging.INFO, logger="logd_trio"):
        tl = TopicLog.open(tmp_path, TOPIC, partition_size=1 << 20, partitions=100,
                           logger=logging.getLogger("logd_trio.server.storage.topic_log"))
    assert tl.head == 400 * 100
    assert sum("rescanning:" in r.getMessage() for r in caplog.records) >= 5
    tl.close()


class SyncRecorder(syscalls.Layer):
    """Records (fd, is a directory) of every fsync and fdatasync."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool]] = []

    def fsync(self, fd: int) -> None:
        self.calls.append((fd, stat.S_ISDIR(os.fstat(fd).st_mode)))
        self.inner.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self.calls.append((fd, stat.S_ISDIR(os.fstat(fd).st_mode)))
        self.inner.fdatasync(fd)


class SeamRecorder(syscalls.Layer):
    """Records (call, fd's file name, argument) of write, ftruncate and fsync."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, int]] = []

    def _name(self, fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        self.calls.append(("write", self._name(fd), len(data)))
        return self.inner.write(fd, data)

    def ftruncate(self, fd: int, length: int) -> None:
        self.calls.append(("ftruncate", self._name(fd), length))
        self.inner.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        self.calls.append(("fsync", self._name(fd), 0))
        self.inner.fsync(fd)


def test_copy_aside_and_truncation_go_through_the_seam(tmp_path: Path) -> None:
    """Copy-aside writes and recovery's truncation of a torn tail use the syscall seam, so
    injected faults and a slow disk apply to them."""
    offs, frames = _write_sample(tmp_path, n=12, psize=10**6)
    lpath = tmp_path / TOPIC / "0.log"
    data = bytearray(lpath.read_bytes())
    bad = offs[4]
    data[bad + len(frames[4]) - 3] ^= 1  # corruption in the middle: copied aside
    lpath.write_bytes(bytes(data) + b"BATCH 9")  # and a torn tail: cut off
    with syscalls.install(SeamRecorder()) as rec:
        tl = open_log(tmp_path, partition_size=10**6)
        tl.close()
    copy = next((tmp_path / TOPIC).glob("0.log.corrupt-*")).name
    assert ("write", copy, offs[5] - bad) in rec.calls and ("fsync", copy, 0) in rec.calls
    assert ("ftruncate", "0.log", len(data)) in rec.calls
