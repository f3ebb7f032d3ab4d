"""The retention-by-age task (server/retention.py) over a real topic log in virtual time: how
long it sleeps (a wall clock stepped forward, a partition waiting for its acknowledgement) and
that it drops nothing while the node follows a leader."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from logd_trio.core.framing import build_body, build_frame
from logd_trio.server import wallclock
from logd_trio.server.replica.follower_log import FollowerLog, FollowerTopic
from logd_trio.server.retention import IDLE_CHECK, expire_by_age
from logd_trio.server.storage.topic_log import TopicLog
from logd_trio.server.topic import Topic

from ..harness import make_config

T0 = 1_000_000_000_000
HOUR = 3600.0


class CountingLog(TopicLog):
    """A topic log that counts the task's checks."""

    checks = 0

    def expire(self, max_age_ms: int) -> int | None:
        self.checks += 1
        return super().expire(max_age_ms)


def make_log(root: Path, n: int = 20) -> CountingLog:
    tl = CountingLog.open(root, "t", partition_size=300, partitions=1000, now_ms=T0)
    assert isinstance(tl, CountingLog)
    for i in range(n):
        tl.tick(T0 + 1000 * i)
        tl.append(build_frame("t", build_body([b"batch %d" % i]), 1), 1)
    assert len(tl._parts) > 2
    return tl


async def test_a_wall_clock_stepped_forward_is_seen_within_a_minute(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    tl = make_log(tmp_path)
    step = [0]
    start = trio.current_time()
    with wallclock.installed(lambda: T0 + 20_000 + step[0] + int((trio.current_time() - start) * 1000)):
        try:
            tl.acknowledge(tl.head)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expire_by_age, tl, 7 * 24 * HOUR, lambda: None)
                await trio.sleep(1)
                assert tl.first == 0  # a week to go: the task sleeps
                step[0] = 8 * 24 * 3_600_000  # the wall clock jumps 8 days
                await trio.sleep(IDLE_CHECK + 1)
                assert tl.first == tl._parts[-1].start  # seen within a minute, not a week later
                nursery.cancel_scope.cancel()
        finally:
            tl.close()


async def test_a_partition_waiting_for_its_ack_backs_off(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """A due partition whose batches are never acknowledged (a topic a failed fsync stopped) does
    not wake the task every 50 ms: the waits double up to a minute."""
    tl = make_log(tmp_path)
    tl.acked = 0
    start = trio.current_time()
    with wallclock.installed(lambda: T0 + 2 * 3_600_000 + int((trio.current_time() - start) * 1000)):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expire_by_age, tl, HOUR, lambda: None)
                await trio.sleep(600)
                assert tl.first == 0
                assert tl.checks < 25, tl.checks  # 50 ms apart: 12000
                tl.acknowledge(tl.head)
                await trio.sleep(IDLE_CHECK + 1)
                assert tl.first == tl._parts[-1].start
                nursery.cancel_scope.cancel()
        finally:
            tl.close()


async def test_a_follower_drops_nothing_by_its_own_clock(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """While the node follows, the leader decides what is kept: its own clock drops nothing."""
    tl = make_log(tmp_path)
    tl.acknowledge(tl.head)
    following = [True]
    start = trio.current_time()
    with wallclock.installed(lambda: T0 + 10 * 3_600_000 + int((trio.current_time() - start) * 1000)):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expire_by_age, tl, HOUR, lambda: None, lambda: following[0])
                await trio.sleep(3 * HOUR)
                assert tl.first == 0 and not tl.removal_pending
                following[0] = False  # it leads now: its retention applies
                await trio.sleep(IDLE_CHECK + 1)
                assert tl.first == tl._parts[-1].start
                nursery.cancel_scope.cancel()
        finally:
            tl.close()


def test_a_follower_topic_follows_while_it_does_not_lead(tmp_path: Path) -> None:
    leading = [False]
    flog = FollowerLog.open(tmp_path, "f", partition_size=300, partitions=10, now_ms=T0)
    assert isinstance(flog, FollowerLog)
    try:
        topic = FollowerTopic("f", flog, make_config(tmp_path), leading=lambda: leading[0])
        assert topic.follows()
        leading[0] = True
        assert not topic.follows()
        assert not Topic("g", flog, make_config(tmp_path)).follows()
    finally:
        flog.close()
