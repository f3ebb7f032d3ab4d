"""A worker's view of the partition files (synchronous, real files written by the owner's storage)."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from logd_trio.server.storage.topic_log import TopicLog
from logd_trio.server.workers.heads import HEADER_SIZE, SLOT_SIZE, HeadTable, HeadWriter, Published
from logd_trio.server.workers.publish import flush_indexes
from logd_trio.server.workers.view import Relay, TopicView, Views

from ...wire import batch_request

N = 20000  # batches in one partition: 480 KB of index records


def _written(tmp_path: Path) -> tuple[TopicLog, list[int]]:
    tl = TopicLog.open(tmp_path, "v", partition_size=1 << 30, partitions=4)
    offsets = [tl.append(batch_request("v", [b"m%d" % i]), 1) for i in range(N)]
    tl.acknowledge(tl.head)
    flush_indexes(tl)
    return tl, offsets


def test_the_first_read_of_a_long_index_reads_a_few_records_not_all(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tl, offsets = _written(tmp_path)
    read: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, pos: int) -> bytes:  # the syscall is counted, the view runs as is
        read.append(n)
        return real(fd, n, pos)

    monkeypatch.setattr(os, "pread", counting)
    view = TopicView(tmp_path, "v")
    pub = Published(1 << 32, tl.head, 0, 0)
    plan = view.plan(pub, offsets[-1], 10)
    try:
        assert [seg[2] for seg in plan.segments] == [tl.head - offsets[-1]]  # the last batch, no further
        assert sum(read) < 64 * 1024, f"{sum(read)} bytes of index read for one READ"  # (of 480 KB)
    finally:
        plan.close()
        view.close()
        tl.close()


def test_a_head_that_is_no_record_end_is_relayed(tmp_path: Path) -> None:
    tl, offsets = _written(tmp_path)
    view = TopicView(tmp_path, "v")
    try:
        with pytest.raises(Relay):  # inside a batch: the index does not end there
            view.plan(Published(1 << 32, offsets[-1] + 3, 0, 0), offsets[0], 10)
        with pytest.raises(Relay):  # beyond what the index holds
            view.plan(Published(1 << 32, tl.head + 40, 0, 0), offsets[0], 10)
        plan = view.plan(Published(1 << 32, offsets[N // 2], 0, 0), offsets[N // 2 - 1], 10)
        assert [seg[2] for seg in plan.segments] == [offsets[N // 2] - offsets[N // 2 - 1]]
        plan.close()
    finally:
        view.close()
        tl.close()


def test_a_slot_read_unstable_keeps_the_view_and_no_slot_drops_it(tmp_path: Path) -> None:
    tl, offsets = _written(tmp_path)
    writer = HeadWriter(tmp_path / "h", 2)
    table = HeadTable(tmp_path / "h")
    writer.publish("v", 1 << 32, tl.head, 0, 0)
    views = Views(tmp_path)
    try:
        pub = table.read("v")
        assert pub is not None
        view = views.get("v")
        view.plan(pub, offsets[0], 1).close()
        fd = os.open(tmp_path / "h", os.O_RDWR)
        mm = mmap.mmap(fd, HEADER_SIZE + 2 * SLOT_SIZE)
        os.close(fd)
        seq = struct.unpack_from("<Q", mm, HEADER_SIZE)[0]
        struct.pack_into("<Q", mm, HEADER_SIZE, seq + 1)  # the owner preempted in the middle of the slot
        views.refresh(table)
        assert table.unstable and views.get("v") is view and view.parts, "an unstable read dropped the view"
        struct.pack_into("<Q", mm, HEADER_SIZE, seq + 2)
        mm.close()
        writer.forget("v")
        views.refresh(table)
        assert not table.unstable and views.get("v") is not view and not view.parts  # deleted: closed
    finally:
        views.close()
        writer.close()
        table.close()
        tl.close()


def test_a_reload_after_an_index_was_replaced_reads_the_new_file(tmp_path: Path) -> None:
    tl, offsets = _written(tmp_path)
    view = TopicView(tmp_path, "v")
    try:
        view.plan(Published(1 << 32, tl.head, 0, 0), offsets[0], 1).close()
        assert len(view.parts) == 1
        index = tmp_path / "v" / "0.index"
        copy = index.with_suffix(".new")
        copy.write_bytes(index.read_bytes())
        os.replace(copy, index)  # as a rebuild puts its file in place
        view.reload((1 << 32) + 1, 0)
        assert os.fstat(view.parts[0].idx.fd).st_ino == os.stat(index).st_ino, "kept the old index file"
        plan = view.plan(Published((1 << 32) + 1, tl.head, 0, 0), offsets[-2], 10)
        assert [seg[2] for seg in plan.segments] == [tl.head - offsets[-2]]
        plan.close()
    finally:
        view.close()
        tl.close()
