"""A follower's topic task: each replicated frame lands at the offset it carries, or nowhere."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from logd_trio.core.framing import build_body, build_frame
from logd_trio.server.replica.follower_log import FollowerLog, FollowerTopic
from logd_trio.server.storage.space import FreeSpace

from ...harness import make_config


def frame(tag: bytes) -> bytes:
    return build_frame("t", build_body([tag]), 1)


class RefuseFirst(FreeSpace):
    """--min-free-space says no to the first frame only (a disk that was nearly full for a moment)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 1)
        self.calls = 0

    def refuse(self, nbytes: int, now: float) -> str | None:
        self.calls += 1
        return "disk nearly full (test)" if self.calls == 1 else None


def stored(root: Path) -> bytes:
    d = root / "t"
    return b"".join((d / n).read_bytes() for n in sorted(os.listdir(d)) if n.endswith(".log"))


async def test_a_refused_frame_does_not_hand_its_offset_to_the_next(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    flog = FollowerLog.open(tmp_path, "t", partition_size=cfg.partition_size, partitions=cfg.partitions,
                            file_mode=cfg.file_mode, dir_mode=cfg.dir_mode)
    assert isinstance(flog, FollowerLog)
    topic = FollowerTopic("t", flog, cfg)
    topic._space = RefuseFirst(tmp_path)
    fa, fb, fc = frame(b"AAAA"), frame(b"BBBB"), frame(b"CCCC")
    n = len(fa)
    async with trio.open_nursery() as nursery:
        await nursery.start(topic.run)
        items = [await topic.append(f, 1, (i * n, False, 0)) for i, f in enumerate((fa, fb, fc))]
        await items[-1].done.wait()
        assert [i.error is not None for i in items] == [True, True, True]
        assert "nearly full" in str(items[0].error)
        assert f"frame for offset {n}, log ends at 0" in str(items[1].error)
        assert topic.visible_head == 0  # B is not stored where the leader has A
        again = await topic.append(fa, 1, (0, False, 0))  # the fetcher's retry from its durable end
        await again.done.wait()
        assert again.error is None and again.offset == 0
        local = await topic.append(fb, 1)  # no placement: a local write, refused
        await local.done.wait()
        assert local.error is not None and "follower" in str(local.error)
        topic.close_input()
    assert stored(tmp_path) == fa


def _open(root: Path, partitions: int) -> FollowerLog:
    flog = FollowerLog.open(root, "t", partition_size=200, partitions=partitions)
    assert isinstance(flog, FollowerLog)
    return flog


async def test_a_leading_cluster_node_applies_its_own_retention(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, partition_size=200, partitions=2)
    flog = _open(tmp_path, 2)
    topic = FollowerTopic("t", flog, cfg, leading=lambda: True)
    async with trio.open_nursery() as nursery:
        await nursery.start(topic.run)
        items = [await topic.append(frame(b"m%03d" % i + b"x" * 40), 1) for i in range(40)]
        await items[-1].done.wait()
        assert all(i.error is None for i in items)
        assert len(flog._parts) == 2 and flog.first > 0  # as a plain leader's log: --partitions 2
        nursery.cancel_scope.cancel()
    names = [n for n in os.listdir(tmp_path / "t") if n.endswith(".log")]
    assert len(names) <= 3  # the removed ones are gone from the disk too (at most one removal in flight)


def test_a_restarted_follower_of_an_idle_leader_drops_what_the_leader_removed(tmp_path: Path) -> None:
    flog = _open(tmp_path, 100)
    offset, starts = 0, []
    for i in range(12):
        f = frame(b"m%03d" % i + b"x" * 60)
        new = i % 3 == 0 and i > 0
        if new:
            starts.append(offset)
        flog.append_placed(f, offset, new, 0)
        offset += len(f)
    flog.acknowledge(flog.head)
    flog.close_without_sync()
    again = _open(tmp_path, 100)  # restarted: leader_first is 0 again, the leader writes nothing more
    assert again.first == 0 and len(again._parts) == 4
    again.follow_first(starts[1])  # an empty FETCH reply says where the leader's log starts now
    assert again.first == starts[1] and len(again._parts) == 2
    assert again.removal_pending
    again.close_without_sync()
