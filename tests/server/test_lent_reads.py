"""A READ whose reply waits for room while its partitions' fds cannot be dup'ed (EMFILE) goes on
from the partitions' own fds, lent by the topic: the lend lasts only while the dup fails, the
topic's end (DELETE, shutdown) never waits for it but closes the files once it is back, and a
follower's cut never closes fds under it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from logd_trio.core.framing import build_body, build_frame
from logd_trio.server.registry import Registry
from logd_trio.server.replica.follower_log import FollowerTopic
from logd_trio.server.stats import Counters
from logd_trio.server.storage import syscalls
from logd_trio.server.storage.replica_log import truncate_to

from ..harness import make_config, start_server
from ..wire import Wire
from .test_connection_fastpath import FailingDup, _frame, _written

MiB = 1 << 20


def _open_under(path: Path) -> list[str]:
    """What this process's fds point to under ``path`` (directories and files)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if str(path) in target:
            out.append(target)
    return out


async def _lent_read(srv_host: str, srv_port: int, failing: FailingDup) -> Wire:
    """A connection whose ``READ t 0 8`` (~8 MiB) has begun and waits for room, lent: its
    partitions' fds could not be dup'ed."""
    slow = await Wire.connect(srv_host, srv_port)
    failing.armed = True
    await slow.send(b"READ t 0 8\r\n")  # more than the socket buffers hold
    with trio.fail_after(10):
        await slow.fill()  # the reply has begun and waits for room
    return slow


async def test_a_lend_lasts_only_while_the_dup_fails(nursery: trio.Nursery, tmp_path: Path) -> None:
    """While the dup fails retention leaves the lent partitions (open, in place); once a dup
    works again the next wait for room takes fds of its own and gives the lend back: retention
    goes on while the reply is still being sent, and the reply is whole."""
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", partition_size=4 * MiB,
                                                  partitions=4, idle_timeout=0, batch_size=2 * MiB))
    frames = [_frame(i, MiB) for i in range(24)]
    await _written(srv.host, srv.port, frames[:8])
    part = tmp_path / "d" / "t"
    with syscalls.install(FailingDup()) as failing:
        slow = await _lent_read(srv.host, srv.port, failing)
        await _written(srv.host, srv.port, frames[8:])  # retention would now drop the first partitions
        taken = await slow.exactly(MiB)  # room: the send goes on, and waits again, the dup still failing
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert (part / "0.log").exists()  # kept while the reply sends from it
        failing.armed = False
    taken += await slow.exactly(MiB)  # room again: at this wait the dup works, the lend is given back
    with trio.fail_after(10):  # retention goes on while the reply is still unread
        while (part / "0.log").exists():  # noqa: ASYNC110 (a worker thread unlinks it)
            await trio.sleep(0.01)
    slow.buf[:0] = taken  # the whole reply, from its start
    with trio.fail_after(20):
        head, frames_read = await slow.read_reply()
    assert head == b"OK 0 8\r\n" and frames_read == frames[:8]
    await slow.send(b"PING\r\n")  # the connection is still served
    assert await slow.line() == b"PONG\r\n"


async def test_a_delete_during_a_lent_send_is_prompt_and_closes_the_files_once_it_is_back(
        nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """DELETE while a READ sends lent: the deletion neither waits for the send nor blames a final
    fsync; the reply is still whole, and once it is sent no fd into the deleted topic is left."""
    caplog.set_level(logging.WARNING)
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", partition_size=4 * MiB,
                                                  partitions=4, idle_timeout=0, batch_size=2 * MiB,
                                                  shutdown_timeout=30))
    frames = [_frame(i, MiB) for i in range(8)]
    await _written(srv.host, srv.port, frames)
    with syscalls.install(FailingDup()) as failing:
        slow = await _lent_read(srv.host, srv.port, failing)
        failing.armed = False  # (the final sync's dups work: the send stays lent until it next waits)
    admin = await Wire.connect(srv.host, srv.port)
    await admin.send(b"DELETE t\r\n")
    with trio.fail_after(5):  # not the 30 s shutdown timeout
        assert (await admin.line()).startswith(b"OK")
    assert any("~deleted~t" in t or "/d/t/" in t for t in _open_under(tmp_path / "d"))  # still lent
    with trio.fail_after(20):
        head, got = await slow.read_reply()
    assert head == b"OK 0 8\r\n" and got == frames
    await trio.testing.wait_all_tasks_blocked()
    assert not [t for t in _open_under(tmp_path / "d") if "~deleted~t" in t or "/d/t" in t]
    assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL]
    await admin.send(b"PING\r\n")
    assert await admin.line() == b"PONG\r\n"


async def test_a_follower_cut_waits_for_a_lent_plan(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A deposed leader's cut removes (closes) the partitions past the cut: while a plan over one
    of them is lent, the cut waits; it runs once the plan is given back."""
    registry = Registry(make_config(tmp_path, acks="all", min_insync=1, node_id="a", etcd="http://127.0.0.1:2379",
                                    cluster="c1", partition_size=250), nursery, Counters())
    state = registry.replica
    state.leading = True
    topic = await registry.get_or_create("t")
    assert isinstance(topic, FollowerTopic)
    offsets = []
    for i in range(3):  # one batch to a partition
        item = await topic.append(build_frame("t", build_body([b"%d" % i * 100]), 1), 1)
        await item.done.wait()
        offsets.append(item.offset)
    plan = await topic.open_read(offsets[2], 10, borrow=True)  # the last partition's own fd
    (fd, pos, length), = plan.segments
    topic.lend()  # as a send does when the dup fails
    state.leading = False
    lent_at_cut: list[int] = []

    def truncate() -> None:  # drops the last partition (it starts at the cut)
        lent_at_cut.append(topic._lent)
        truncate_to(topic.log, offsets[2])

    cut_done = trio.Event()

    async def cut() -> None:
        await topic.cut(truncate)
        cut_done.set()

    nursery.start_soon(cut)
    await trio.testing.wait_all_tasks_blocked()
    assert not cut_done.is_set() and not lent_at_cut  # waits for the lend
    assert len(os.pread(fd, length, pos)) == length  # the lent fd is the partition's, still open
    topic.give_back()
    plan.close()
    with trio.fail_after(10):
        await cut_done.wait()
    assert lent_at_cut == [0] and topic.log.head == offsets[2]
    topic.close_input()
