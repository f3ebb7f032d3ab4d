"""The per-request fast paths of a connection: a READ answered by the reader task itself,
from a *borrowed* plan (the partitions' own fds, no dup) that takes fds of its own before any
wait, and a graceful shutdown that lets such a reply finish."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from logd_trio.server.sockio import raw_socket
from logd_trio.server.storage.topic_log import TopicLog

from ..harness import make_config, start_server
from ..wire import Wire, batch_request


def _frame(i: int, size: int) -> bytes:
    return batch_request("t", [bytes([65 + i % 26]) * size])


def test_a_borrowed_plan_uses_the_partition_fds_until_it_owns_its_own(tmp_path: Path) -> None:
    tl = TopicLog.open(tmp_path, "t", partition_size=100, partitions=1)
    first = _frame(0, 40)
    assert len(first) < 100
    tl.append(first, 1)
    plan = tl.read_plan(0, 1, borrow=True)
    (fd, pos, length), = plan.segments
    assert plan.borrowed and os.pread(fd, length, pos) == first
    plan.own()
    (owned, _, _), = plan.segments
    assert not plan.borrowed and owned != fd
    tl.append(_frame(1, 40), 1)
    tl.acknowledge(tl.head)
    job = tl.remove_job()  # retention drops the first partition and closes its fd
    assert job is not None
    job.run()
    assert not (tmp_path / "t" / "0.log").exists()
    assert os.pread(owned, length, pos) == first  # the plan's own fd still reads it
    plan.close()
    try:
        os.fstat(owned)
        raise AssertionError("the plan's fd is still open")
    except OSError:
        pass
    borrowed = tl.read_plan(tl.first, 1, borrow=True)
    (fd, _, _), = borrowed.segments
    borrowed.close()
    os.fstat(fd)  # closing a borrowed plan leaves the partition's fd open
    tl.close()


async def _written(srv_host: str, srv_port: int, frames: list[bytes]) -> None:
    w = await Wire.connect(srv_host, srv_port)
    await w.send(b"".join(frames))  # a BATCH request is the frame stored
    for _ in frames:
        assert (await w.reply()).startswith(b"OK ")
    await w.aclose()


async def test_a_read_blocked_on_a_slow_reader_survives_retention(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The reader answers a READ with nothing ahead of it from the partitions' own fds; when the
    socket fills it dups them, so retention unlinking (and closing) the partitions meanwhile
    does not cut the reply short or send another file's bytes."""
    size = 1 << 20
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", partition_size=4 * size,
                                                  partitions=4, idle_timeout=0, batch_size=2 * size))
    frames = [_frame(i, size) for i in range(24)]  # 3 or 4 to a partition
    await _written(srv.host, srv.port, frames[:8])
    slow = await Wire.connect(srv.host, srv.port)
    await slow.send(b"READ t 0 8\r\n")  # ~8 MiB over 2-3 partitions: more than the socket buffers hold
    with trio.fail_after(10):
        await slow.fill()  # the reply has begun: it is planned, and it waits for room (fds dup'ed)
    await _written(srv.host, srv.port, frames[8:])  # retention keeps the last 4 partitions
    part = tmp_path / "d" / "t"
    with trio.fail_after(10):  # until the partitions the reply covers are gone
        while min(int(p.name.split(".")[0]) for p in part.glob("*.log")) < 8 * len(frames[0]):  # noqa: ASYNC110
            await trio.sleep(0.01)
    head, got = await slow.read_reply()
    assert head == b"OK 0 8\r\n"
    assert got == frames[:8]


async def test_shutdown_lets_a_reply_answered_by_the_reader_finish(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    """stop_reading() while the reader sends a READ reply does not cancel that send: the client
    that reads on gets the whole reply, then the connection closes."""
    size = 1 << 20
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", timeout=20.0,
                                                  shutdown_timeout=30.0, idle_timeout=0, batch_size=2 * size))
    frames = [_frame(i, size) for i in range(8)]
    await _written(srv.host, srv.port, frames)
    slow = await Wire.connect(srv.host, srv.port)
    await slow.send(b"READ t 0 8\r\n")
    await trio.sleep(0.5)  # blocked sending

    async with trio.open_nursery() as n:
        n.start_soon(srv.stop)
        await trio.sleep(0.1)  # stop_reading() has run
        head, got = await slow.read_reply()
    assert head == b"OK 0 8\r\n"
    assert got == frames
    assert await slow.closed()


async def test_one_request_at_a_time_batches_and_reads_see_each_other(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A client with one request in flight gets its BATCH and READ answers from the reader task:
    each READ sees the batch acknowledged just before it, offsets run on, errors keep their text."""
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never"))
    w = await Wire.connect(srv.host, srv.port)
    offset = 0
    for i in range(20):
        frame = _frame(i, 10 + i)
        await w.send(frame)
        assert await w.reply() == b"OK %d 1\r\n" % offset
        await w.send(b"READ t %d 1\r\n" % offset)
        assert await w.read_reply() == (b"OK %d 1\r\n" % offset, [frame])
        offset += len(frame)
        await w.send(b"READ t %d 1\r\n" % offset)  # the head: nothing there yet
        assert (await w.reply()).startswith(b"ERR ")
    await w.send(b"TAIL t 1\r\n")
    head, got = await w.read_reply()
    assert head == b"OK 0 1\r\n" and got == [_frame(0, 10)]


async def test_replies_keep_request_order_after_a_protocol_error(nursery: trio.Nursery, tmp_path: Path) -> None:
    """An ERR for a bad line is a reply ahead of the next requests: a READ right behind it is
    not answered first, and a READ pipelined behind a BATCH still sees that batch."""
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never"))
    w = await Wire.connect(srv.host, srv.port)
    first = batch_request("t", [b"one"])
    await w.send(first)
    assert await w.reply() == b"OK 0 1\r\n"
    w2 = await Wire.connect(srv.host, srv.port)
    await w2.send(b"FOO\r\nREAD t 0 1\r\n")  # one write: the ERR is still queued when READ is parsed
    assert (await w2.reply()).startswith(b"ERR ")
    header, frames = await w2.read_reply()
    assert header == b"OK 0 1\r\n" and frames == [first]
    second = batch_request("t", [b"two"])
    await w2.send(second + b"READ t %d 1\r\n" % len(first))  # after the ERR was sent and counted
    assert await w2.reply() == b"OK %d 1\r\n" % len(first)
    header, frames = await w2.read_reply()
    assert header == b"OK %d 1\r\n" % len(first) and frames == [second]


async def test_idle_timeout_still_applies_after_a_protocol_error(
        nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", idle_timeout=5.0))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"FOO\r\n")
    assert (await w.reply()).startswith(b"ERR ")
    t0 = trio.current_time()
    with trio.fail_after(60):  # (it was never closed: the ERR's reply was counted down, not up)
        assert await w.closed()
    assert 5.0 <= trio.current_time() - t0 < 5.5


async def test_a_request_arriving_as_the_idle_deadline_fires_is_answered_and_the_connection_stays(
        nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock) -> None:
    """The data and the deadline in one scheduler turn: the reader took the data, so the
    request is served in full and the connection is not closed as idle."""
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", idle_timeout=1.0))
    w = await Wire.connect(srv.host, srv.port)
    frame = batch_request("t", [b"x" * 100])
    await w.send(frame)
    assert await w.reply() == b"OK 0 1\r\n"
    await trio.sleep(0.9)
    raw_socket(w.stream.socket).send(b"READ t 0 1\r\n")  # synchronous: no checkpoint between the send and the jump
    vclock.jump(0.2)  # past the idle deadline before the server's reader runs again
    header, frames = await w.read_reply()
    assert header == b"OK 0 1\r\n" and frames == [frame]
    await w.send(b"PING\r\n")
    assert await w.reply() == b"PONG\r\n"



async def test_a_pipelined_read_shows_earlier_batches_of_its_connection_and_no_later_one(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """READ between two BATCHes of one send: the topic may store the later batch before the
    writer gets to the READ (fsync never; before, about every second READ showed it)."""
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", idle_timeout=0))
    w = await Wire.connect(srv.host, srv.port)
    for i in range(20):
        t = f"t{i}"
        one, two, three = (batch_request(t, [m]) for m in (b"one", b"two", b"three"))
        await w.send(one + b"READ %s 0 10\r\n" % t.encode() + two + b"TAIL %s 10\r\n" % t.encode() + three)
        assert await w.reply() == b"OK 0 1\r\n"
        assert await w.reply() == b"OK 0 1\r\n" and await w.exactly(len(one)) == one  # READ: "one" only
        assert await w.reply() == b"OK %d 1\r\n" % len(one)
        assert await w.reply() == b"OK 0 2\r\n" and await w.exactly(len(one) + len(two)) == one + two  # TAIL
        assert await w.reply() == b"OK %d 1\r\n" % (len(one) + len(two))
    await w.aclose()


async def test_a_pipelined_long_poll_gets_the_later_batch_it_waited_for(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", idle_timeout=0))
    w = await Wire.connect(srv.host, srv.port)
    one, two = batch_request("t", [b"one"]), batch_request("t", [b"two"])
    await w.send(one)
    assert await w.reply() == b"OK 0 1\r\n"
    await w.send(b"READ t %d 10 30000\r\n" % len(one) + two)  # a long-poll at the head, then a BATCH
    assert await w.reply() == b"OK %d 1\r\n" % len(one) and await w.exactly(len(two)) == two
    assert await w.reply() == b"OK %d 1\r\n" % len(one)
    await w.aclose()
