"""The head table (seqlock slots in a shared file) and the relay's reply splitter, on plain files."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from logd_trio.core.framing import build_body
from logd_trio.core.requests import encode_batch
from logd_trio.server.workers.heads import HEADER_SIZE, SLOT_SIZE, HeadTable, HeadWriter, Published
from logd_trio.server.workers.replies import BadRelay, ReplySplitter


def test_a_published_slot_reads_back_and_a_forgotten_one_does_not(tmp_path: Path) -> None:
    w = HeadWriter(tmp_path / "h", 4)
    r = HeadTable(tmp_path / "h")
    assert r.read("a") is None
    assert w.publish("a", 1, 100, 0, 0)
    assert r.read("a") == Published(1, 100, 0, 0)
    assert w.publish("a", 2, 250, 40, 10)  # same slot, new values
    assert r.read("a") == Published(2, 250, 40, 10)
    assert w.publish("b", 1 << 32 | 1, 5, 0, 0)
    w.forget("a")
    assert r.read("a") is None and r.read("b") == Published(1 << 32 | 1, 5, 0, 0)
    assert w.publish("c", 3, 7, 0, 0)  # reuses a's slot: a stays unknown, c is found
    assert r.read("a") is None and r.read("c") == Published(3, 7, 0, 0)


def test_a_missing_topic_is_found_once_published_after_a_miss(tmp_path: Path) -> None:
    w = HeadWriter(tmp_path / "h", 8)
    r = HeadTable(tmp_path / "h")
    assert r.read("late") is None  # remembered as missing for this count of assignments
    assert r.read("late") is None
    w.publish("late", 1, 9, 0, 0)
    assert r.read("late") == Published(1, 9, 0, 0)


def test_a_full_table_or_a_long_name_publishes_nothing(tmp_path: Path) -> None:
    w = HeadWriter(tmp_path / "h", 2)
    assert w.publish("a", 1, 1, 0, 0) and w.publish("b", 1, 1, 0, 0)
    assert not w.publish("c", 1, 1, 0, 0)
    assert "c" not in w
    w.forget("a")
    assert not w.publish("x" * 300, 1, 1, 0, 0)
    with pytest.raises(ValueError):
        w.publish("d", 0, 1, 0, 0)


def test_a_slot_being_written_is_never_read(tmp_path: Path) -> None:
    path = tmp_path / "h"
    w = HeadWriter(path, 2)
    r = HeadTable(path)
    w.publish("a", 1, 100, 0, 0)
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, HEADER_SIZE + 2 * SLOT_SIZE)
    os.close(fd)
    seq = struct.unpack_from("<Q", mm, HEADER_SIZE)[0]
    assert seq % 2 == 0 and seq > 0
    struct.pack_into("<Q", mm, HEADER_SIZE, seq + 1)  # a writer in the middle of the slot
    struct.pack_into("<Q", mm, HEADER_SIZE + 16, 999)  # a half-written head
    assert r.read("a") is None  # retried, never stable: not served
    struct.pack_into("<QQQ", mm, HEADER_SIZE, seq + 2, 1, 999)
    assert r.read("a") == Published(1, 999, 0, 0)
    mm.close()


def test_a_file_that_is_not_a_head_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="not a head table"):
        HeadTable(tmp_path / "x")


def _read_reply(offset: int, frames: list[bytes]) -> bytes:
    return b"OK %d %d\r\n" % (offset, len(frames)) + b"".join(frames)


def test_the_splitter_counts_replies_split_anywhere() -> None:
    frame = encode_batch("t", build_body([b"hello", b"OK 1 1\r\n"]), 2)
    stream = (b"OK 0 1\r\n" + _read_reply(0, [frame, frame]) + b"MOK 6\r\nab\r\ncd\r\n" + b"ERR not found\r\n"
              + _read_reply(5, [frame]) + b"PONG\r\n")
    owed = [False, True, False, True, True, False]
    for step in (1, 3, 7, len(stream)):
        splitter, left, done = ReplySplitter(), list(owed), 0
        for i in range(0, len(stream), step):
            n = splitter.feed(stream[i:i + step], left)
            assert n >= 0
            del left[:n]
            done += n
        assert done == len(owed) and not left


def test_the_splitter_refuses_bytes_beyond_the_replies_owed() -> None:
    assert ReplySplitter().feed(b"OK\r\nOK\r\n", [False]) == -1
    with pytest.raises(BadRelay):
        ReplySplitter().feed(b"OK 0 1\r\nnot a frame\r\n", [True])
