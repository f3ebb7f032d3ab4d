"""Time on every batch (storage, no trio): the v2 index round trip, old (v1) indexes and Go data
directories, SEEK's exact boundaries, retention by age; real files, times set by ``tick``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from logd_trio.core.framing import build_body, build_frame
from logd_trio.server.storage import recovery
from logd_trio.server.storage.index import HEADER
from logd_trio.server.storage.topic_log import TopicLog

from .index_files import put_end, records, times, v1_of

TOPIC = "t"
T0 = 1_000_000_000_000  # 2001-09-09 (Unix ms): earlier than any file's mtime, so recovery keeps the times


def frame(i: int) -> bytes:
    return build_frame(TOPIC, build_body([b"batch %d " % i + b"x" * (i % 7)]), 1)


def open_log(root: Path, psize: int = 400, partitions: int = 1000) -> TopicLog:
    return TopicLog.open(root, TOPIC, partition_size=psize, partitions=partitions, now_ms=T0)


def write_timed(root: Path, times: list[int], psize: int = 400) -> list[int]:
    """Append one batch per time (each after ``tick(time)``), close; the batches' offsets."""
    tl = open_log(root, psize)
    offs = []
    for i, t in enumerate(times):
        tl.tick(t)
        offs.append(tl.append(frame(i), 1))
    tl.close()
    return offs


def index_files(root: Path) -> list[Path]:
    return sorted((root / TOPIC).glob("*.index"), key=lambda p: int(p.name.split(".")[0]))


@pytest.fixture(params=["verify-window", "trust-index"])
def window(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.param == "trust-index":
        monkeypatch.setattr(recovery, "VERIFY_TAIL", 0)
    yield


TIMES = [T0 + 1000 * (i // 3) for i in range(40)]  # three batches per second, 14 seconds


def test_index_v2_round_trip_keeps_every_time(tmp_path: Path, window: None) -> None:
    offs = write_timed(tmp_path, TIMES)
    files = index_files(tmp_path)
    assert len(files) > 3  # several partitions
    before = {p.name: p.read_bytes() for p in files}
    assert all(raw.startswith(HEADER) for raw in before.values())
    assert [t for p in files for _, _, t in records(p.read_bytes())] == TIMES
    tl = open_log(tmp_path)
    try:
        assert tl.last_append_ms == TIMES[-1]
        for t in TIMES:
            first = TIMES.index(t)
            assert tl.seek(t) == offs[first]  # exactly at a batch's time: the first batch of that time
            assert tl.seek(t - 1) == offs[first]
        assert tl.seek(TIMES[0] - 10**9) == offs[0]
        assert tl.seek(TIMES[-1] + 1) == tl.head  # after everything: the head
        assert tl.seek(TIMES[-1] + 1, end=offs[5]) == offs[5]  # never past the end asked for
        assert tl.seek(TIMES[-1], end=offs[5]) == offs[5]
    finally:
        tl.close()
    assert {p.name: p.read_bytes() for p in index_files(tmp_path)} == before  # reopening changed nothing


def test_times_never_go_back_when_the_clock_does(tmp_path: Path) -> None:
    offs = write_timed(tmp_path, [T0, T0 + 500, T0 + 100, T0 + 700], psize=10**6)
    got = times(index_files(tmp_path)[0].read_bytes())
    assert got == [T0, T0 + 500, T0 + 500, T0 + 700]
    tl = open_log(tmp_path, 10**6)
    try:
        assert tl.seek(T0 + 200) == offs[1]
        tl.tick(T0)  # a restart with a clock far behind: later batches still sort after
        tl.append(frame(9), 1)
        assert tl.seek(T0 + 700) == offs[-1]
        assert tl.seek(T0 + 701) == tl.head
    finally:
        tl.close()
    assert times(index_files(tmp_path)[0].read_bytes())[-1] >= T0 + 700


def _set_mtime(path: Path, ms: int) -> None:
    os.utime(path, ns=(ms * 1_000_000, ms * 1_000_000))


def test_v1_index_opens_and_counts_as_its_last_write(tmp_path: Path) -> None:
    """An index an earlier release wrote (no header, 16-byte records): it opens (no rescan), keeps its
    format, and its batches count as written at the partition's last write (the .log's mtime)."""
    offs = write_timed(tmp_path, TIMES)
    files = index_files(tmp_path)
    logs = [p.with_suffix(".log") for p in files]
    for n, p in enumerate(files):
        p.write_bytes(v1_of(p.read_bytes()))
        _set_mtime(logs[n], T0 + 100_000 * (n + 1))  # partition n last written at T0 + (n+1) * 100 s
    v1 = {p.name: p.read_bytes() for p in files}
    starts = [int(p.name.split(".")[0]) for p in files]
    slack = recovery.MTIME_SLACK_MS  # an mtime is coarse: it stands for a little later
    tl = open_log(tmp_path)
    try:
        assert tl.seek(T0) == starts[0]
        assert tl.seek(T0 + 100_000 + slack) == starts[0]  # at its last write: still in it
        assert tl.seek(T0 + 100_000 + slack + 1) == starts[1]  # a start: its batches' times are unknown
        assert tl.seek(T0 + 100_000 * len(files) + slack + 1) == tl.head
        assert tl.last_append_ms == T0 + 100_000 * len(files) + slack
        tl.tick(T0 + 10**9)
        for i in range(40, 60):  # the head partition stays v1; new partitions are v2
            tl.append(frame(i), 1)
        n_parts = len(tl._parts)
    finally:
        tl.close()
    after = index_files(tmp_path)
    assert len(after) == n_parts > len(files)
    for p in after:
        raw = p.read_bytes()
        if p.name in v1:
            assert not raw.startswith(HEADER) and raw[: len(v1[p.name])] == v1[p.name]
        else:
            assert raw.startswith(HEADER) and {t for _, _, t in records(raw)} == {T0 + 10**9}
    tl = open_log(tmp_path)  # and the mix opens again
    try:
        assert tl.seek(T0 + 10**9) == int(after[len(files)].name.split(".")[0])
        with tl.read_plan(offs[0], 10**6) as plan:
            assert plan.segments
    finally:
        tl.close()


def test_go_data_dir_gets_v2_indexes_with_the_logs_mtime(tmp_path: Path) -> None:
    offs = write_timed(tmp_path, TIMES)
    files = index_files(tmp_path)
    for n, p in enumerate(files):
        p.unlink()
        p.with_suffix(".idx").write_bytes(b"\x01\x02go")  # Go's own index: left alone
        _set_mtime(p.with_suffix(".log"), T0 + 100_000 * (n + 1))
    tl = open_log(tmp_path)
    try:
        assert tl.seek(T0 + 100_000) == offs[0]
        assert tl.seek(T0 + 100_000 * len(files)) == int(files[-1].name.split(".")[0])
        assert tl.seek(T0 + 100_000 * len(files) + recovery.MTIME_SLACK_MS + 1) == tl.head
    finally:
        tl.close()
    for n, p in enumerate(index_files(tmp_path)):
        raw = p.read_bytes()
        assert raw.startswith(HEADER)
        assert {t for _, _, t in records(raw)} == {T0 + 100_000 * (n + 1) + recovery.MTIME_SLACK_MS}
        assert p.with_suffix(".idx").read_bytes() == b"\x01\x02go"


def test_a_rebuilt_index_keeps_the_times_it_can(tmp_path: Path) -> None:
    """While running, a rebuilt index (from the .log) keeps the old index's time for each batch
    ending where an old record does; one the old index misplaced gets the next old record's time,
    batches past what the old index held the time of the next batch appended after them (so SEEK
    may start early, never late); times never go back."""
    offs = write_timed(tmp_path, TIMES, psize=10**6)
    tl = open_log(tmp_path, 10**6)
    try:
        path = index_files(tmp_path)[0]
        raw = bytearray(path.read_bytes())
        put_end(raw, 7, records(raw)[7][0] + 1)  # under the server, record 7 goes wrong (batch 8 still
        path.write_bytes(raw[: len(raw) - 3 * 24])  # ends where it did) and the last three are lost
        tl.tick(T0 + 60_000)
        tl.append(frame(99), 1)  # pending when the rebuild starts
        job = tl.rebuild_job(0, -1)
        assert job is not None
        job.run()
        tl.apply_rebuild(job)
        assert tl.seek(T0 + 2000) == offs[6]
        assert tl.seek(TIMES[-1]) == offs[-3]  # the lost ones: as late as the batch after them
        assert tl.seek(T0 + 60_001) == tl.head
    finally:
        tl.close()
    got = [t for _, _, t in records(index_files(tmp_path)[0].read_bytes())]
    assert got == TIMES[:7] + [TIMES[8]] + TIMES[8:37] + [T0 + 60_000] * 4


def test_retention_by_age_exact_boundary(tmp_path: Path) -> None:
    """A sealed partition goes once its newest batch is *older* than the limit (not at it);
    never the head partition; never one with unacknowledged batches."""
    tl = open_log(tmp_path, psize=300)
    try:
        for i in range(30):
            tl.tick(T0 + 1000 * i)
            tl.append(frame(i), 1)
        parts = [(p.start, p.newest) for p in tl._parts]
        assert len(parts) > 3
        hour = 3_600_000
        tl.tick(parts[0][1] + hour)
        tl.acknowledge(tl.head)
        assert tl.expire(hour) == 1  # exactly at the limit: kept, due in 1 ms
        assert tl.first == parts[0][0] and not tl.removal_pending
        tl.tick(parts[0][1] + hour + 1)
        due = tl.expire(hour)
        assert tl.first == parts[1][0]
        assert due == parts[1][1] - parts[0][1]
        job = tl.remove_job()
        assert job is not None and [p.name for p in job.paths] == [f"{parts[0][0]}.log", f"{parts[0][0]}.index"]
        job.run()
        tl.removed()
        assert not (tmp_path / TOPIC / f"{parts[0][0]}.log").exists()
        tl.tick(T0 + 100 * hour)
        tl.acked = tl._parts[-2].start  # the last sealed partition is not acknowledged yet
        assert tl.expire(hour) == 1
        assert tl.first == tl._parts[-2].start == tl._parts[0].start  # it waits for its ack
        tl.acknowledge(tl.head)
        assert tl.expire(hour) is None  # only the head is left, however old
        assert tl.first == tl._parts[-1].start == parts[-1][0]
        assert tl.seek(T0) == tl.first  # SEEK never answers a removed offset
    finally:
        tl.close()
    assert [p.name for p in index_files(tmp_path)] == [f"{parts[-1][0]}.index"]
