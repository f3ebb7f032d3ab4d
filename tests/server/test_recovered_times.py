"""Batch times a crash damaged (storage, no trio; real files): recovery checks the times an index
holds before it trusts them (never decreasing, no later than the log's last change, no earlier than
the partition before), takes the log's mtime for those it cannot trust, and a damaged header makes
a version-2 index again (docs/storage.md)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from logd_trio.core.framing import build_body, build_frame
from logd_trio.server.storage import recovery
from logd_trio.server.storage.index import HEADER, HEADER_SIZE, REC_V2
from logd_trio.server.storage.topic_log import TopicLog

from .index_files import records, times

TOPIC = "t"
T0 = 1_000_000_000_000  # Unix ms (2001): every file's mtime is set explicitly, after it
SLACK = recovery.MTIME_SLACK_MS
HOUR = 3_600_000


def frame(i: int) -> bytes:
    return build_frame(TOPIC, build_body([b"batch %d" % i]), 1)


def open_log(root: Path, now: int, psize: int = 300) -> TopicLog:
    return TopicLog.open(root, TOPIC, partition_size=psize, partitions=1000, now_ms=now)


def write(root: Path, n: int, psize: int = 300, step: int = 1000) -> list[int]:
    """``n`` batches, one a ``step`` ms from T0; every log's mtime then T0 + n * step (its last
    write, roughly); the index files' names, oldest first."""
    tl = open_log(root, T0, psize)
    for i in range(n):
        tl.tick(T0 + step * i)
        tl.append(frame(i), 1)
    tl.close()
    starts = sorted(int(p.name[:-4]) for p in (root / TOPIC).glob("*.log"))
    for s in starts:
        set_mtime(root / TOPIC / f"{s}.log", T0 + step * n)
    return starts


def set_mtime(path: Path, ms: int) -> None:
    os.utime(path, ns=(ms * 1_000_000, ms * 1_000_000))


def put_time(path: Path, k: int, value: int) -> None:
    """Overwrite record ``k``'s time (as a torn page would leave it; k < 0 counts from the end)."""
    raw = bytearray(path.read_bytes())
    n = (len(raw) - HEADER_SIZE) // REC_V2.size
    struct.pack_into("<Q", raw, HEADER_SIZE + (k % n) * REC_V2.size + 16, value)
    path.write_bytes(raw)


def index(root: Path, start: int) -> Path:
    return root / TOPIC / f"{start}.index"


def test_a_zero_time_in_a_sealed_partition_does_not_make_it_old(tmp_path: Path) -> None:
    """A sealed partition whose last record's time a crash zeroed: its newest batch counts as
    appended at the log's last change, not in 1970, so retention by age keeps it."""
    starts = write(tmp_path, 20)
    assert len(starts) > 2
    put_time(index(tmp_path, starts[0]), -1, 0)
    mtime = T0 + 20_000
    tl = open_log(tmp_path, mtime + HOUR // 2)
    try:
        assert tl._parts[0].newest == mtime + SLACK
        tl.acknowledge(tl.head)
        tl.expire(HOUR)
        assert tl.first == starts[0]  # half an hour old: kept
        tl.tick(mtime + SLACK + HOUR + 1)
        tl.expire(HOUR)
        assert tl.first == starts[-1]  # and it goes when it is old
    finally:
        tl.close()


def test_a_huge_time_does_not_become_the_clock(tmp_path: Path) -> None:
    """Garbage in the head's last time (2**62): not the time of every later batch, not SEEK's."""
    starts = write(tmp_path, 20, psize=10**6)
    assert starts == [0]
    put_time(index(tmp_path, 0), -1, 2**62)
    now = T0 + 60_000
    tl = open_log(tmp_path, now, psize=10**6)
    try:
        assert tl.now_ms == now
        assert tl.last_append_ms == T0 + 20_000 + SLACK
        last = tl.append(frame(99), 1)
        assert tl.seek(now) == last
        assert tl.seek(T0 + 19_000) < last
    finally:
        tl.close()
    got = times(index(tmp_path, 0).read_bytes())
    assert got[:19] == [T0 + 1000 * i for i in range(19)]  # the good ones are kept
    assert got[19:] == [T0 + 20_000 + SLACK, now]


@pytest.mark.parametrize("torn", [0, 2**62, 1])
def test_a_torn_time_in_the_tail_rescans_from_there(tmp_path: Path, torn: int) -> None:
    """A time on the other side of a page boundary than its record's position: records before it
    keep their times, it and those after get the log's mtime (never a time going back)."""
    starts = write(tmp_path, 40, psize=10**6)
    put_time(index(tmp_path, 0), 30, torn)
    tl = open_log(tmp_path, T0 + HOUR, psize=10**6)
    tl.close()
    got = times(index(tmp_path, starts[0]).read_bytes())
    assert got == [T0 + 1000 * i for i in range(30)] + [T0 + 40_000 + SLACK] * 10


def test_times_earlier_than_the_partition_before_are_not_trusted(tmp_path: Path) -> None:
    """(A stand-in is an upper bound: the partitions after keep their own, earlier, times.)"""
    starts = write(tmp_path, 20)
    assert len(starts) > 2
    before = times(index(tmp_path, starts[2]).read_bytes())
    put_time(index(tmp_path, starts[1]), 0, T0 - 1)  # before partition 0's newest
    tl = open_log(tmp_path, T0 + HOUR)
    try:
        assert {tl._parts[1].idx.time(k) for k in range(len(tl._parts[1].idx))} == {T0 + 20_000 + SLACK}
        assert tl.seek(tl._parts[0].newest + 1) == starts[1]  # early (its batches may be that late)
    finally:
        tl.close()
    assert times(index(tmp_path, starts[2]).read_bytes()) == before


def test_future_times_and_a_damaged_frame_never_go_back(tmp_path: Path) -> None:
    """Times later than the log's last change (a clock that went back) are stand-ins like the rest;
    the placeholder record of a damaged range never has an earlier time than the one before."""
    write(tmp_path, 20, psize=10**6, step=HOUR)  # times up to 19 hours after T0 ...
    log = tmp_path / TOPIC / "0.log"
    recs = records(index(tmp_path, 0).read_bytes())
    raw = bytearray(log.read_bytes())
    raw[recs[10][0] - 3] ^= 0xFF  # batch 11's body: damaged, valid batches follow
    log.write_bytes(raw)
    set_mtime(log, T0 + 5 * HOUR)  # ... but its last write 5 hours after T0
    tl = open_log(tmp_path, T0 + 6 * HOUR, psize=10**6)
    try:
        assert tl._parts[0].bad  # the damaged range is withheld
    finally:
        tl.close()
    got = times(index(tmp_path, 0).read_bytes())
    assert len(got) == 20
    assert got == sorted(got) and max(got) <= T0 + 5 * HOUR + SLACK
    assert got[:5] == [T0 + HOUR * i for i in range(5)]


@pytest.mark.parametrize("damage", ["zeros", "garbage", "short"])
def test_a_damaged_header_makes_a_v2_index_again(tmp_path: Path, damage: str) -> None:
    """A zero-filled or garbled header (an index that trusts no record) is rebuilt as version 2,
    not taken for an old version-1 file: its batches get the log's mtime, new ones their time."""
    starts = write(tmp_path, 20)
    for s in (starts[0], starts[-1]):  # a sealed partition and the head
        p = index(tmp_path, s)
        raw = p.read_bytes()
        if damage == "zeros":
            p.write_bytes(bytes(len(raw)))
        elif damage == "garbage":
            p.write_bytes(b"\x07" * 16 + raw[16:])
        else:
            p.write_bytes(raw[:5])
    now = T0 + HOUR
    tl = open_log(tmp_path, now)
    try:
        assert all(p.idx.timed for p in tl._parts)
        last = tl.append(frame(99), 1)
        assert tl.seek(now) == last
    finally:
        tl.close()
    for s in (starts[0], starts[-1]):
        raw = index(tmp_path, s).read_bytes()
        assert raw.startswith(HEADER)
        assert set(times(raw)) <= {T0 + 20_000 + SLACK, now}


def test_seek_on_an_index_cut_under_the_server_answers_the_partition_start(tmp_path: Path) -> None:
    """An index file truncated while the server runs: SEEK answers its partition's start (early,
    never late) instead of failing; a READ there rebuilds the index."""
    tl = open_log(tmp_path, T0, psize=10**7)
    try:
        for i in range(8192):  # 32 pages of records: more than the index keeps in memory
            tl.tick(T0 + i)
            tl.append(frame(i), 1)
        tl.close()
        tl = open_log(tmp_path, T0 + HOUR, psize=10**7)
        assert tl.seek(T0 + 100) > 0
        os.truncate(index(tmp_path, 0), HEADER_SIZE + 10 * REC_V2.size)
        tl._parts[0].idx._pages.clear()  # (what a cache of other pages would hold by then)
        assert tl.seek(T0 + 100) == 0
        assert tl.seek(T0 + 10**9) == tl.head  # (newer than everything: no index read)
    finally:
        tl.close()


def test_a_newest_batch_far_ahead_of_the_clock_is_kept_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Times no later than the log's last change are plausible even if that was a day after the
    clock's now (the clock went back): they are kept, times do not go back, and the log says so."""
    write(tmp_path, 5, psize=10**6)
    day = 24 * HOUR
    set_mtime(tmp_path / TOPIC / "0.log", T0 + 5000)
    with caplog.at_level("WARNING"):
        tl = open_log(tmp_path, T0 - day, psize=10**6)
    try:
        assert tl.now_ms == T0 + 4000
        assert any("after the clock's now" in r.getMessage() for r in caplog.records)
    finally:
        tl.close()
    caplog.clear()
    with caplog.at_level("WARNING"):
        open_log(tmp_path, T0 + 4000, psize=10**6).close()
    assert not any("after the clock's now" in r.getMessage() for r in caplog.records)
