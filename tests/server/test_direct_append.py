"""A BATCH appended by the connection itself while the topic task waits on an empty inbox
(Topic.append_now): never ahead of a batch queued before it, nothing visible before its
acknowledgement, the early syncs still the task's, and the follower's topic never takes it."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.lowlevel
import trio.testing

from logd_trio.core.framing import build_body, build_frame
from logd_trio.server.topic import Topic

from ..harness import make_config


def frame(i: int) -> bytes:
    return build_frame("t", build_body([b"message %d" % i]), 1)


async def started(nursery: trio.Nursery, tmp_path: Path, **config: object) -> Topic:
    topic = Topic.open(tmp_path, "t", make_config(tmp_path, **config))
    await nursery.start(topic.run)
    await trio.testing.wait_all_tasks_blocked()  # the task now waits on its empty inbox
    return topic


async def test_an_idle_topic_appends_at_once_and_acknowledges_on_return(nursery: trio.Nursery,
                                                                         tmp_path: Path) -> None:
    topic = await started(nursery, tmp_path, fsync="never")
    item = topic.append_now(frame(0), 1)
    assert item is not None and item.done.is_set() and item.error is None
    assert item.offset == 0 and topic.visible_head == topic.log.head == item.end
    plan = await topic.open_read(0, 10)
    with plan:
        assert plan.nbatches == 1
    topic.close_input()


async def test_a_queued_batch_is_never_overtaken(nursery: trio.Nursery, tmp_path: Path) -> None:
    topic = await started(nursery, tmp_path, fsync="never")
    queued = topic.try_append(frame(0), 1)  # handed to the task, which has not run yet
    assert queued is not None and not queued.done.is_set()
    assert topic.append_now(frame(1), 1) is None  # it must wait its turn: queued, not written
    later = topic.try_append(frame(1), 1)
    assert later is not None
    await later.done.wait()
    assert queued.offset == 0 < later.offset == queued.end
    await trio.testing.wait_all_tasks_blocked()
    direct = topic.append_now(frame(2), 1)  # idle again
    assert direct is not None and direct.offset == later.end
    topic.close_input()
    assert topic.append_now(frame(3), 1) is None  # input closed: never written past the end


async def test_with_fsync_always_nothing_is_acknowledged_before_its_fsync(nursery: trio.Nursery,
                                                                          tmp_path: Path) -> None:
    topic = await started(nursery, tmp_path, fsync="always")
    item = topic.append_now(frame(0), 1)
    assert item is not None and not item.done.is_set()
    assert topic.visible_head == 0 and topic.log.fsync_count == 0  # written, not yet readable
    with trio.fail_after(10):
        await item.done.wait()
    assert topic.log.fsync_count >= 1 and topic.visible_head == item.end
    topic.close_input()


async def test_an_early_sync_is_still_the_tasks(nursery: trio.Nursery, tmp_path: Path) -> None:
    """fsync never with flush_batches: no syncer task exists, so the sync the second direct
    append calls for can only be the topic task's (woken for it); meanwhile appends queue."""
    topic = await started(nursery, tmp_path, fsync="never", flush_batches=2)
    assert topic.append_now(frame(0), 1) is not None
    assert topic.append_now(frame(1), 1) is not None  # the second: an early sync is due
    assert topic.append_now(frame(2), 1) is None  # the task was woken for it: appends queue now
    queued = topic.try_append(frame(2), 1)
    assert queued is not None
    with trio.fail_after(10):
        await queued.done.wait()
        while topic.log.fsync_count == 0:  # the sync runs in a worker thread
            await trio.lowlevel.checkpoint()
    assert topic.log.fsync_count == 1 and queued.offset == len(frame(0)) + len(frame(1))
    topic.close_input()
