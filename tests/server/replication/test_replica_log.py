"""Exact appends, fetch plans, start moves, truncation and the leader-epoch file, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from logd_trio.core.errors import NotFound, StorageError
from logd_trio.core.framing import build_body, build_frame, parse_frame_header
from logd_trio.server.replica.state import ReplicaState
from logd_trio.server.storage.epochs import EPOCHS_NAME, EpochFile
from logd_trio.server.storage.replica_log import OffsetMismatch, append_at, fetch_plan, start_at, truncate_to
from logd_trio.server.storage.topic_log import TopicLog

from ...harness import make_config

TOPIC = "t"


def frame(i: int, n: int = 3) -> bytes:
    return build_frame(TOPIC, build_body([b"m%d-%d-%s" % (i, k, b"x" * (i % 17)) for k in range(n)]), n)


def open_log(root: Path, partition_size: int = 1 << 20, partitions: int = 100) -> TopicLog:
    return TopicLog.open(root, TOPIC, partition_size=partition_size, partitions=partitions)


def log_files(root: Path) -> dict[str, bytes]:
    d = root / TOPIC
    names = sorted((n for n in os.listdir(d) if n.endswith(".log")), key=lambda n: int(n.split(".")[0]))
    return {n: (d / n).read_bytes() for n in names}


def replicate(leader: TopicLog, follower: TopicLog, max_bytes: int) -> int:
    """Copy everything from the leader through fetch plans; return the number of fetches."""
    fetches = 0
    while follower.head < leader.head:
        if follower.head < leader.first:  # the reply says where the leader starts: an empty follower moves there
            start_at(follower, leader.first)
        plan, starts = fetch_plan(leader, follower.head, max_bytes, leader.head)
        fetches += 1
        with plan:
            data = b"".join(os.pread(fd, n, pos) for fd, pos, n in plan.segments)
        assert data, "a fetch below the head returns at least one batch"
        at, offset = 0, follower.head
        while at < len(data):
            h = parse_frame_header(data, at)
            assert h is not None
            append_at(follower, offset, data[at:at + h.frame_len], new_partition=offset in starts)
            offset += h.frame_len
            at += h.frame_len
    return fetches


def test_follower_files_match_the_leader_byte_for_byte(tmp_path: Path) -> None:
    leader = open_log(tmp_path / "a", partition_size=700)
    for i in range(120):
        leader.append(frame(i), 3)
    assert leader.rotations > 5
    # A different partition size on the follower: the starts in the fetch decide, not its own setting.
    with leader, open_log(tmp_path / "b", partition_size=1 << 20) as follower:
        fetches = replicate(leader, follower, max_bytes=450)
        assert fetches > 10
        assert follower.head == leader.head
        follower.sync()
        leader.sync()
    assert log_files(tmp_path / "b") == log_files(tmp_path / "a")
    with open_log(tmp_path / "b") as again:  # recovery accepts the copy
        assert again.head == sum(len(frame(i)) for i in range(120))


def test_follower_joins_after_retention(tmp_path: Path) -> None:
    leader = open_log(tmp_path / "a", partition_size=600, partitions=3)
    for i in range(100):
        leader.append(frame(i), 3)
    leader.acknowledge(leader.head)
    assert leader.first > 0
    with leader, open_log(tmp_path / "b") as follower:
        with pytest.raises(NotFound):
            fetch_plan(leader, 0, 1000, leader.head)
        replicate(leader, follower, max_bytes=10_000)
        assert (follower.first, follower.head) == (leader.first, leader.head)
        leader.sync()
        job = leader.remove_job()
        if job is not None:
            job.run()
        follower.sync()
    assert log_files(tmp_path / "b") == log_files(tmp_path / "a")
    with open_log(tmp_path / "b") as again:
        assert again.first == leader.first


def test_append_at_refuses_wrong_offsets_and_bad_frames(tmp_path: Path) -> None:
    with open_log(tmp_path) as tl:
        f = frame(1)
        with pytest.raises(OffsetMismatch, match="log ends at 0"):
            append_at(tl, 5, f, new_partition=False)
        bad = bytearray(f)
        bad[-3] ^= 0x01
        with pytest.raises(OffsetMismatch, match="CRC or framing"):
            append_at(tl, 0, bytes(bad), new_partition=False)
        with pytest.raises(OffsetMismatch):
            append_at(tl, 0, f + f[:10], new_partition=False)  # trailing bytes
        assert tl.head == 0
        assert append_at(tl, 0, f, new_partition=False) == 0
        assert tl.head == len(f)
        with tl.read_plan(0, 10) as plan:
            assert plan.nbatches == 1


def test_start_at_refuses_a_topic_with_data(tmp_path: Path) -> None:
    with open_log(tmp_path) as tl:
        tl.append(frame(0), 3)
        with pytest.raises(StorageError, match="holds data"):
            start_at(tl, 1000)


def test_fetch_plan_errors_and_limits(tmp_path: Path) -> None:
    with open_log(tmp_path, partition_size=500) as tl:
        offsets = [tl.append(frame(i), 3) for i in range(20)]
        with pytest.raises(OffsetMismatch, match="inside a batch"):
            fetch_plan(tl, offsets[3] + 1, 100, tl.head)
        with pytest.raises(NotFound):
            fetch_plan(tl, tl.head + 1, 100, tl.head + 10)
        plan, starts = fetch_plan(tl, tl.head, 100, tl.head)
        assert plan.nbytes == 0 and starts == []
        # a budget smaller than one batch still returns that batch, and only it
        plan, _ = fetch_plan(tl, offsets[2], 1, tl.head)
        with plan:
            assert plan.nbytes == offsets[3] - offsets[2]
        # ``stop`` caps the range at a batch boundary (an epoch end, the acknowledged head)
        plan, _ = fetch_plan(tl, offsets[0], 1 << 20, offsets[5])
        with plan:
            assert plan.nbytes == offsets[5]


def test_truncate_copies_aside_then_cuts(tmp_path: Path) -> None:
    tl = open_log(tmp_path, partition_size=500)
    offsets = [tl.append(frame(i), 3) for i in range(30)]
    tl.sync()
    before = b"".join(log_files(tmp_path).values())
    cut = offsets[7]
    with pytest.raises(OffsetMismatch):
        truncate_to(tl, cut + 2)
    copies = truncate_to(tl, cut)
    assert tl.head == cut
    assert b"".join(c.read_bytes() for c in copies) == before[cut:]
    assert b"".join(log_files(tmp_path).values()) == before[:cut]
    # appending continues where the cut was, and a restart agrees
    assert tl.append(frame(99), 3) == cut
    tl.close()
    with open_log(tmp_path, partition_size=500) as again:
        assert again.head == cut + len(frame(99))
        with again.read_plan(cut, 1) as plan:
            assert plan.nbatches == 1


def test_truncate_at_a_partition_start_removes_that_partition(tmp_path: Path) -> None:
    with open_log(tmp_path, partition_size=500) as tl:
        for i in range(30):
            tl.append(frame(i), 3)
        starts = sorted(int(n.split(".")[0]) for n in log_files(tmp_path))
        copies = truncate_to(tl, starts[2])
        assert sorted(int(n.split(".")[0]) for n in log_files(tmp_path)) == starts[:2]
        assert len(copies) == len(starts) - 2  # the cut partition, whole, and every later one
        assert tl.head == starts[2]


def test_epoch_file(tmp_path: Path) -> None:
    ef = EpochFile.load(tmp_path)
    assert ef.latest == 0 and ef.epoch_at(100) == 0
    ef.assign(1, 0)
    ef.assign(1, 50)  # same epoch: nothing to write
    ef.assign(2, 100)
    ef.assign(3, 100)  # epoch 2 wrote nothing: replaced
    ef.assign(4, 300)
    assert (tmp_path / EPOCHS_NAME).read_text() == "1 0\n3 100\n4 300\n"
    again = EpochFile.load(tmp_path)
    assert again.entries == [(1, 0), (3, 100), (4, 300)]
    assert [again.epoch_at(x) for x in (0, 99, 100, 299, 300, 10**6)] == [1, 1, 3, 3, 4, 4]
    assert [again.end_of(x) for x in (0, 100, 300)] == [100, 300, None]
    with pytest.raises(StorageError, match="does not follow"):
        again.assign(2, 400)
    with pytest.raises(StorageError, match="does not follow"):
        again.assign(5, 200)
    again.truncate(100)
    assert EpochFile.load(tmp_path).entries == [(1, 0)]


@pytest.mark.parametrize("text", ["1 0\n1 5\n", "2 10\n3 5\n", "1\n", "a b\n"])
def test_epoch_file_refuses_bad_content(tmp_path: Path, text: str) -> None:
    (tmp_path / EPOCHS_NAME).write_text(text)
    with pytest.raises(StorageError, match=EPOCHS_NAME):
        EpochFile.load(tmp_path)


def test_recovery_leaves_the_epoch_file_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open_log(tmp_path) as tl:
        tl.append(frame(0), 3)
    EpochFile.load(tmp_path / TOPIC).assign(1, 0)
    with open_log(tmp_path):
        pass
    assert "stray" not in caplog.text
    assert (tmp_path / TOPIC / EPOCHS_NAME).exists()


def test_an_epoch_starting_past_the_recovered_head_is_dropped_at_open(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, node_id="a")
    s = ReplicaState(cfg)
    s.load()
    t = s.open_topic(tmp_path, TOPIC)
    t.log.append(frame(1), 3)
    t.log.sync()
    head = t.log.head
    t.log.close()
    # the log lost its tail below the last epoch's start (recovery cut a torn frame): the file still has it
    (tmp_path / TOPIC / EPOCHS_NAME).write_text(f"1 0\n2 {head + 100}\n")
    s2 = ReplicaState(cfg)
    s2.load()  # epoch 2
    t2 = s2.open_topic(tmp_path, TOPIC)
    assert s2.epochs[TOPIC].entries == [(1, 0), (2, head)]
    assert (tmp_path / TOPIC / EPOCHS_NAME).read_text() == f"1 0\n2 {head}\n"
    t2.log.close()
