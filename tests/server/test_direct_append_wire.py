"""The direct append (Topic.append_now) through a real connection: a lone BATCH on an idle topic
is written by the connection's own task, BATCHes arriving together go to the topic task, a
direct append refused behind one waiting for its fsync is answered after it, and the early sync
a direct append calls for (``fsync=interval``) is made at once by the topic task."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from logd_trio.server.storage import syscalls
from logd_trio.server.storage.syscalls import Layer

from ..harness import make_config, start_server
from ..wire import Wire, batch_request

TOPIC_TASK = "Registry._run"  # the topic task's coroutine (server/registry.py)


def _is_log(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(".log")
    except OSError:
        return False


class Watch(Layer):
    """Records which Trio task writes each batch to a partition (.log), and the syncs of .log files;
    an fsync can be held (``hold``) and a .log write made to fail with ENOSPC (``full``)."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: list[str] = []  # one per .log write attempt
        self.syncs: list[int] = []  # fds of .log files fsynced
        self.handing: list[str] = []  # the tasks handing storage work to a worker thread
        self.hold = False
        self.full = False
        self.in_sync = threading.Event()
        self.release = threading.Event()

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, pos: int) -> int:
        if _is_log(fd):
            self.writers.append(trio.lowlevel.current_task().name)
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
        return self.inner.pwrite(fd, data, pos)

    def _sync(self, fd: int) -> None:
        if _is_log(fd):
            self.syncs.append(fd)
            if self.hold:
                self.in_sync.set()
                assert self.release.wait(20)

    def fsync(self, fd: int) -> None:
        self._sync(fd)
        self.inner.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd)
        self.inner.fdatasync(fd)

    def blocking(self) -> contextlib.AbstractContextManager[None]:
        self.handing.append(trio.lowlevel.current_task().name)
        return self.inner.blocking()


def _batch(i: int) -> bytes:
    return batch_request("t", [b"message %02d" % i])


async def _created(w: Wire) -> None:
    """The topic exists (its first BATCH is the topic task's) and its task waits on an empty inbox."""
    await w.send(_batch(0))
    assert (await w.line()).startswith(b"OK ")
    await trio.testing.wait_all_tasks_blocked()


async def test_a_lone_batch_on_an_idle_topic_is_appended_by_the_connection(nursery: trio.Nursery,
                                                                          tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path, fsync="never", idle_timeout=0))
    w = await Wire.connect(srv.host, srv.port)
    with syscalls.install(Watch()) as watch:
        await _created(w)
        del watch.writers[:]
        await w.send(_batch(1))
        assert (await w.line()).startswith(b"OK ")
        assert len(watch.writers) == 1 and TOPIC_TASK not in watch.writers[0]  # at once, by the connection
        await trio.testing.wait_all_tasks_blocked()
        del watch.writers[:]
        await w.send(_batch(2) + _batch(3) + _batch(4))  # one receive: more follow each of them
        replies = [await w.line() for _ in range(3)]
        assert all(r.startswith(b"OK ") for r in replies)
        assert len(watch.writers) == 3 and all(TOPIC_TASK in t for t in watch.writers)  # queued at the task
        await trio.testing.wait_all_tasks_blocked()
        del watch.writers[:]
        await w.send(_batch(5))
        assert (await w.line()).startswith(b"OK ")
        assert len(watch.writers) == 1 and TOPIC_TASK not in watch.writers[0]
    await w.send(b"READ t 0 10\r\n")
    head, frames = await w.read_reply()
    assert head.startswith(b"OK 0 6") and frames == [_batch(i) for i in range(6)]  # in order


async def test_a_direct_append_refused_behind_one_waiting_for_its_fsync_is_answered_after_it(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """fsync always: BATCH 1 is written at once and waits for its fsync (held); BATCH 2 is written
    at once too and refused (ENOSPC).  Nothing is answered before the fsync; then BATCH 1's OK,
    then BATCH 2's error; the topic goes on."""
    srv = await start_server(nursery, make_config(tmp_path, fsync="always", idle_timeout=0))
    w = await Wire.connect(srv.host, srv.port)
    with syscalls.install(Watch()) as watch:
        await _created(w)
        del watch.writers[:]
        watch.hold = True
        await w.send(_batch(1))
        assert await trio.to_thread.run_sync(watch.in_sync.wait, 10)  # BATCH 1's fsync is under way
        watch.full = True
        await w.send(_batch(2))
        with trio.fail_after(10):
            while len(watch.writers) < 2:  # noqa: ASYNC110 (the connection's reader writes it)
                await trio.sleep(0.001)
        assert not any(TOPIC_TASK in t for t in watch.writers)  # both at once, by the connection
        watch.full = False
        with trio.move_on_after(0.1):  # nothing is answered before the fsync
            await w.fill()
            raise AssertionError(f"answered before the fsync: {w.buf!r}")
        watch.hold = False
        watch.release.set()
        with trio.fail_after(10):
            first, second = await w.line(), await w.line()
        assert first.startswith(b"OK ") and second.startswith(b"ERR ")
        await w.send(_batch(3))
        with trio.fail_after(10):
            assert (await w.line()).startswith(b"OK ")


@pytest.mark.parametrize("trigger", ["flush_batches", "rotation"])
async def test_with_fsync_interval_the_early_sync_a_direct_append_calls_for_is_made_at_once(
        nursery: trio.Nursery, tmp_path: Path, trigger: str) -> None:
    """An interval of an hour: the fsync that ``--flush-batches 2`` (or a rotation) calls for after
    the second BATCH, written at once by the connection, is the topic task's, made right away."""
    extra = {"flush_batches": 2} if trigger == "flush_batches" else {"partition_size": len(_batch(0)) + 10}
    srv = await start_server(nursery, make_config(tmp_path, fsync="interval", flush_interval=3600.0,
                                                  idle_timeout=0, **extra))
    w = await Wire.connect(srv.host, srv.port)
    with syscalls.install(Watch()) as watch:
        await _created(w)
        assert not watch.syncs
        del watch.writers[:], watch.handing[:]
        await w.send(_batch(1))
        assert (await w.line()).startswith(b"OK ")
        assert len(watch.writers) == 1 and TOPIC_TASK not in watch.writers[0]  # direct
        with trio.fail_after(10):
            while not watch.syncs:  # noqa: ASYNC110 (a worker thread fsyncs)
                await trio.sleep(0.001)
        assert watch.handing and all(TOPIC_TASK in t for t in watch.handing)  # the task's sync
