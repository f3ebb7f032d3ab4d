"""A deposed leader's cut of its log (a worker thread) is kept apart from reads and the scrub on
the Trio thread (server/cutgate.py): a read that comes during the cut waits for it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from logd_trio.core.framing import build_body, build_frame
from logd_trio.server.cutgate import CutGate
from logd_trio.server.registry import Registry
from logd_trio.server.replica.follower_log import FollowerTopic
from logd_trio.server.stats import Counters
from logd_trio.server.storage.replica_log import truncate_to

from ...harness import make_config


async def test_a_read_during_a_cut_waits_until_the_cut_is_over(nursery: trio.Nursery, tmp_path: Path) -> None:
    registry = Registry(make_config(tmp_path, acks="all", min_insync=1, node_id="a", etcd="http://127.0.0.1:2379",
                                    cluster="c1"), nursery, Counters())
    state = registry.replica
    state.leading = True
    topic = await registry.get_or_create("t")
    assert isinstance(topic, FollowerTopic)
    offsets = []
    for i in range(3):
        item = await topic.append(build_frame("t", build_body([b"m%d" % i]), 1), 1)
        await item.done.wait()
        offsets.append(item.offset)
    state.leading = False  # deposed: the last batch was never acknowledged elsewhere
    in_cut, release = threading.Event(), threading.Event()

    def truncate() -> None:
        in_cut.set()
        assert release.wait(10)
        truncate_to(topic.log, offsets[2])

    cut_done = trio.Event()

    async def cut() -> None:
        await topic.cut(truncate)
        cut_done.set()

    nursery.start_soon(cut)
    assert await trio.to_thread.run_sync(in_cut.wait, 10)  # the cut runs in its worker thread now
    read: list[int] = []

    async def reader() -> None:
        plan = await topic.open_read(offsets[0], 10)
        read.append(plan.nbatches)
        plan.close()

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    assert not read, "a read was planned while the log was being cut"
    release.set()
    with trio.fail_after(10):
        await cut_done.wait()
        while not read:  # noqa: ASYNC110 (the reader appends)
            await trio.sleep(0.01)
    assert read == [2] and topic.log.head == offsets[2]
    topic.close_input()


async def test_a_cut_waits_for_the_users_inside_and_keeps_new_ones_out(autojump_clock: trio.testing.MockClock) -> None:
    gate = CutGate()
    events: list[str] = []

    async def user(name: str, seconds: float) -> None:
        async def work() -> None:
            events.append(f"{name} in")
            await trio.sleep(seconds)
            events.append(f"{name} out")
        await gate.use(work)

    async def cutter() -> None:
        async def work() -> None:
            events.append("cut in")
            await trio.sleep(1)
            events.append("cut out")
        await gate.cut(work)

    async with trio.open_nursery() as n:
        n.start_soon(user, "a", 2.0)
        await trio.sleep(0.1)
        n.start_soon(cutter)
        await trio.sleep(0.1)
        n.start_soon(user, "b", 0.5)  # comes while the cut waits for a: after the cut
    assert events == ["a in", "a out", "cut in", "cut out", "b in", "b out"]
    assert gate.users == 0


async def test_a_user_that_fails_leaves_the_gate() -> None:
    gate = CutGate()

    async def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await gate.use(boom)
    assert gate.users == 0

    async def nothing() -> int:
        return 7

    with trio.fail_after(1):
        assert await gate.cut(nothing) == 7
