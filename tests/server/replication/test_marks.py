"""High watermarks (never back, checkpointed in few writes), history ids, and the fetch plan's partition
cap: real files, virtual time."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio
import trio.testing

from logd_trio.core.errors import StorageError
from logd_trio.core.requests import Cluster, RequestParser
from logd_trio.server.metrics import Snapshot, families
from logd_trio.server.replica.marks import HW_FILE, Watermarks, read_history, write_history
from logd_trio.server.replica.state import ReplicaState
from logd_trio.server.stats import Counters
from logd_trio.server.storage.replica_log import fetch_plan
from logd_trio.server.storage.syscalls import Layer, install

from ...harness import make_config
from .test_replica_log import frame, open_log


def test_marks_only_move_forward_unless_the_log_is_cut(tmp_path: Path) -> None:
    m = Watermarks(tmp_path, 0o600)
    assert m.get("t") == 0 and m.raise_to("t", 100) and not m.raise_to("t", 50)
    assert m.get("t") == 100
    m.cut("t", 120)
    assert m.get("t") == 100
    m.cut("t", 40)
    assert m.get("t") == 40
    m.save(m.marks)
    again = Watermarks(tmp_path, 0o600)
    again.load()
    assert again.marks == {"t": 40}


@pytest.mark.parametrize("text", ["t\n", "t x\n", "../t 5\n", "t 5 6\n"])
def test_a_bad_checkpoint_is_a_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / HW_FILE).write_text(text)
    with pytest.raises(StorageError, match=r"high-watermark:1: expected '<topic> <offset>'"):
        Watermarks(tmp_path, 0o600).load()


async def test_many_moves_make_few_checkpoints(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    m = Watermarks(tmp_path, 0o600)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.run)
        for i in range(1, 1001):  # a thousand batches in 0.1 s
            m.raise_to("t", i * 10)
            await trio.sleep(0.0001)
        while m.checkpoints < 1:  # noqa: ASYNC110 (a worker thread writes; virtual time may jump meanwhile)
            await trio.sleep(0.01)
        assert m.checkpoints == 1 and (tmp_path / HW_FILE).read_text() == "t 10000\n"
        await trio.sleep(5)  # nothing moved: nothing written
        assert m.checkpoints == 1
        m.raise_to("u", 7)
        nursery.cancel_scope.cancel()  # a stop writes what moved since
    assert (tmp_path / HW_FILE).read_text() == "t 10000\nu 7\n"


def test_history_ids(tmp_path: Path) -> None:
    assert read_history(tmp_path) == ""
    write_history(tmp_path, "0123abcd", 0o600)
    assert read_history(tmp_path) == "0123abcd"
    (tmp_path / "history-id").write_text("not/an id\n")
    with pytest.raises(StorageError, match="expected a short id"):
        read_history(tmp_path)


async def test_a_leader_keeps_its_high_watermark_when_followers_drop_out(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    s = ReplicaState(make_config(tmp_path, acks="all", min_insync=2, replica_lag=1.0, node_id="a"))
    s.record("b", "t", 0, 0)
    s.record("b", "t", 300, 300)
    assert s.high_watermark("t", 500) == 300
    await trio.sleep(5)  # b left the in-sync set: what it acknowledged stays readable
    assert s.in_sync(trio.current_time()) == set()
    assert s.high_watermark("t", 500) == 300
    assert s.high_watermark("t", 200) == 200  # never past the log's own head


def test_a_follower_reads_up_to_what_the_leader_told(tmp_path: Path) -> None:
    s = ReplicaState(make_config(tmp_path, node_id="b", replicate_from="127.0.0.1:1"))
    assert s.high_watermark("t", 500) == 0  # nothing told yet, no checkpoint
    s.told("t", 300)
    s.told("t", 100)  # an older answer does not move it back
    assert s.high_watermark("t", 500) == 300 and s.high_watermark("t", 250) == 250


async def test_replication_numbers_reach_stats_and_metrics(tmp_path: Path) -> None:
    counters = Counters()
    s = ReplicaState(make_config(tmp_path, acks="all", min_insync=2, replica_lag=1.0, node_id="a"), counters)
    counters.fetch_bytes_out = 1234
    snap = Snapshot.take(counters, None, 0, True, "x")
    got = {m.name: m.samples[0].value for m in families(snap) if m.name.startswith("logd_replication")}
    assert got["logd_replication_served_bytes"] == 1234
    assert got["logd_replication_insync"] == 1 and got["logd_replication_halted"] == 0
    s.halted = "another history"
    assert counters.replica_gauges()["halted"] == 1


def test_a_fetch_plan_spans_at_most_the_partitions_it_may_hold(tmp_path: Path) -> None:
    with open_log(tmp_path, partition_size=500) as tl:
        for i in range(40):
            tl.append(frame(i), 3)
        assert len(tl._parts) > 4
        plan, _ = fetch_plan(tl, tl.first, 1 << 20, tl.head, max_partitions=2)
        with plan:
            assert len(plan.segments) == 2 and plan.nbytes == tl._parts[1].end - tl.first
        plan, _ = fetch_plan(tl, tl.first, 1 << 20, tl.head)
        with plan:
            assert len(plan.segments) == len(tl._parts)


async def test_a_reply_tells_the_high_watermark_its_frames_make_once_stored(tmp_path: Path) -> None:
    for insync, want in ((2, 300), (3, 100)):
        root = tmp_path / str(insync)
        s = ReplicaState(make_config(root, acks="all", min_insync=insync, replica_lag=1.0, node_id="a"))
        topic = await trio.to_thread.run_sync(s.open_topic, root, "t")
        topic.visible_head = 300
        for n in ("b", "c"):
            s.record(n, "t", 100, 100)  # both in sync at 100
        assert s.leader_hw("t", 300) == 100  # what the in-sync set holds now
        # b's reply carries [100, 300): once b stored it, 300 is on two nodes (leader and b), not on three
        assert s.leader_hw("t", 300, "b", 300) == want
        assert s.leader_hw("t", 300, "stranger", 300) == 100  # a node not in sync counts for nothing
        topic.log.close_without_sync()


async def test_a_topic_opened_below_its_checkpointed_mark_in_a_worker_thread(tmp_path: Path) -> None:
    (tmp_path / HW_FILE).write_text("t 500\n")  # the topic's directory was removed while the node was stopped
    s = ReplicaState(make_config(tmp_path, node_id="b", replicate_from="127.0.0.1:1"))
    await trio.to_thread.run_sync(s.load)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.marks.run)  # waits on the checkpoint's event
        await trio.testing.wait_all_tasks_blocked()
        topic = await trio.to_thread.run_sync(s.open_topic, tmp_path, "t")  # as Registry._start does
        assert s.marks.get("t") == 0
        await s.marks._flush()  # the checkpoint task's next write has the lowered mark
        assert (tmp_path / HW_FILE).read_text() == "t 0\n"
        nursery.cancel_scope.cancel()
    topic.log.close_without_sync()


class _ShortWrites(Layer):
    """Every write comes up short by one byte, then the disk is full."""

    def __init__(self) -> None:
        super().__init__()
        self.short = False

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, pos: int) -> int:
        if self.short:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.short = True
        return self.inner.pwrite(fd, memoryview(data)[:len(data) - 1], pos)


def test_a_short_checkpoint_write_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    marks = Watermarks(tmp_path, 0o644)
    marks.save({"t": 100})
    with install(_ShortWrites()), pytest.raises(StorageError, match="No space left"):
        marks.save({"t": 200, "u": 7})
    assert (tmp_path / HW_FILE).read_text() == "t 100\n"
    marks.load()
    assert marks.get("t") == 100


async def test_the_history_probe_is_small_whatever_the_topics_and_followers(tmp_path: Path) -> None:
    parser = RequestParser()
    parser.receive_data(b"CLUSTER HISTORY\r\nCLUSTER\r\n")
    assert [parser.next_event(), parser.next_event()] == [Cluster(history=True), Cluster()]
    s = ReplicaState(make_config(tmp_path, node_id="a"))
    s.history = "h-123"
    for i in range(2000):
        for n in ("b", "c"):
            s.record(n, f"t{i}", 0, 0)
    small = s.extension_reply(Cluster(history=True))
    assert small == b'MOK 20\r\n{"history": "h-123"}\r\n'
    assert len(s.extension_reply(Cluster())) > 100_000  # what every fetch connection asked for before


class _FullDisk(Layer):
    """Every write fails with ENOSPC while ``full``."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True
        self.attempts = 0

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, pos: int) -> int:
        self.attempts += 1
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.inner.pwrite(fd, data, pos)


async def test_a_full_disk_slows_checkpoint_retries_and_their_log_lines(
        tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    m = Watermarks(tmp_path, 0o600)
    disk = _FullDisk()
    with install(disk), caplog.at_level("WARNING", logger="logd_trio.server.replica"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.run)
            m.raise_to("t", 10)
            start = trio.current_time()
            while m.failures < 8:  # marks keep moving while the disk is full
                await trio.sleep(1)
                m.raise_to("t", m.get("t") + 10)
            elapsed = trio.current_time() - start
            # 8 tries wait 1 + 2 + 4 + 8 + 16 + 30 + 30 s between them (a slow worker thread only
            # adds virtual time); the old code tried again every 1.2 s (8 tries in about 10 s)
            assert elapsed >= 91 and m.checkpoints == 0
            errors = [r for r in caplog.records if r.levelname == "ERROR"]
            assert 2 <= len(errors) <= 2 + elapsed / 60  # the first, then one a minute (was one a try)
            assert "No space left" in errors[0].getMessage()
            assert "failures in a row" in errors[-1].getMessage()
            disk.full = False
            while m.checkpoints < 1:  # noqa: ASYNC110 (a worker thread writes; virtual time may jump)
                await trio.sleep(1)
            assert (tmp_path / HW_FILE).read_text() == f"t {m.get('t')}\n"
            assert m.failures == 0 and "written again after" in caplog.records[-1].getMessage()
            nursery.cancel_scope.cancel()
