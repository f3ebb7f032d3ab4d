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
