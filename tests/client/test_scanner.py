"""Scanner against a real server: multi-batch offsets, start positions, limit,
follow (long-poll and polling), checkpoints, retention policy, restarts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Unpack

import anyio
import anyio.abc
import pytest

from logd_trio.client.checkpoint import FileCheckpoint, MemoryCheckpoint, Position
from logd_trio.client.client import Client, open_client
from logd_trio.client.positions import Last
from logd_trio.client.scanner import ScannerOptions
from logd_trio.core.errors import BadReply, CheckpointError, NotFound, OffsetRemoved
from logd_trio.core.framing import build_body, build_frame
from logd_trio.core.replies import Message

from ..harness import FAST_RETRY
from .live import (
    LiveServer,
    new_server,
    read_line,
    scripted_peer,
    virtual_or_scaled,
    virtual_time,
)

pytestmark = pytest.mark.anyio


async def scan(client: Client, topic: str, **kw: Unpack[ScannerOptions]) -> list[Message]:
    out: list[Message] = []
    async with client.scanner(topic, **kw) as s:
        async for m in s:
            out.append(m)
    return out


async def write_batches(client: Client, topic: str, batches: list[list[bytes]]) -> list[Message]:
    """Write the batches; return the messages with the positions computed independently."""
    expected: list[Message] = []
    offset = None
    for msgs in batches:
        off = await client.batch(topic, msgs)
        if offset is not None:
            assert off == offset
        body = build_body(msgs)
        delta = 0
        for m in msgs:
            expected.append(Message(topic, off, delta, m))
            delta += len(b"MSG %d\r\n" % len(m)) + len(m) + 2
        assert delta == len(body)
        offset = off + len(build_frame(topic, body, len(msgs)))
    return expected


BATCHES = [[b"a"], [b"bb", b"c\r\nc"], [b"d" * 300, b"", b"e"], [b"f"], [b"g", b"h"]]


@pytest.mark.parametrize("read_size", [1, 2, 1000])
async def test_multi_batch_offsets(client: Client, read_size: int) -> None:
    expected = await write_batches(client, "mb", BATCHES)
    assert await scan(client, "mb", read_size=read_size) == expected


async def test_start_positions_and_limit(client: Client) -> None:
    expected = await write_batches(client, "sp", BATCHES)
    third = expected[3]  # the first message of the third batch
    assert await scan(client, "sp", offset=third.offset) == expected[3:]
    assert await scan(client, "sp", offset=third.offset, delta=expected[4].delta) == expected[4:]
    assert await scan(client, "sp", limit=4) == expected[:4]
    assert await scan(client, "sp", limit=0) == []
    with pytest.raises(NotFound):
        await scan(client, "sp", offset=third.offset + 1)


async def test_empty_and_unknown_topics_end_cleanly(client: Client) -> None:
    assert await scan(client, "default") == []
    assert await scan(client, "never-written") == []
    await client.batch("once", [b"x"])
    assert [m.body for m in await scan(client, "once")] == [b"x"]


@virtual_time(0)
@pytest.mark.parametrize("longpoll", [True, False])
async def test_follow_sees_new_messages(
    server: LiveServer, tg: anyio.abc.TaskGroup, longpoll: bool
) -> None:
    # without extensions the client behaves as against Go logd: polling
    async with open_client(server.addr, retry=FAST_RETRY, extensions=None if longpoll else False) as client:
        await _follow_sees_new_messages(client, tg)


async def _follow_sees_new_messages(client: Client, tg: anyio.abc.TaskGroup) -> None:
    got: list[bytes] = []
    done = anyio.Event()

    async def reader() -> None:
        async with client.scanner("later", follow=True, limit=3, poll_interval=0.5) as s:
            async for m in s:
                got.append(m.body)
        done.set()

    tg.start_soon(reader)
    await anyio.sleep(2)  # the topic does not exist yet: the reader waits
    assert got == []
    await client.batch("later", [b"1"])
    await anyio.sleep(2)
    assert got == [b"1"]
    await client.batch("later", [b"2", b"3"])
    await done.wait()
    assert got == [b"1", b"2", b"3"]


async def test_follow_survives_server_restart(
    client: Client, server: LiveServer, tg: anyio.abc.TaskGroup
) -> None:
    await client.batch("rs", [b"1"])
    got: list[bytes] = []
    seen = [anyio.Event(), anyio.Event()]

    async def reader() -> None:
        async with client.scanner("rs", follow=True, limit=2, wait_ms=200) as s:
            async for m in s:
                got.append(m.body)
                seen[len(got) - 1].set()

    tg.start_soon(reader)
    await seen[0].wait()
    await server.stop()
    await anyio.sleep(0.3)
    await server.start()
    await client.batch("rs", [b"2"])
    with anyio.fail_after(10):
        await seen[1].wait()
    assert got == [b"1", b"2"]


async def test_checkpoint_resume_at_least_once(client: Client, tmp_path: Path) -> None:
    expected = await write_batches(client, "cp", BATCHES)
    cp = FileCheckpoint(tmp_path / "cp.json")
    first = await scan(client, "cp", checkpoint=cp, limit=2)
    assert first == expected[:2]
    saved = json.loads((tmp_path / "cp.json").read_text())
    assert saved == {"topic": "cp", "offset": expected[2].offset, "delta": expected[2].delta}
    rest = await scan(client, "cp", checkpoint=cp)
    assert rest == expected[2:]
    assert await scan(client, "cp", checkpoint=cp) == []  # at the end: nothing new
    assert await scan(client, "cp", checkpoint=cp, from_beginning=True) == expected
    # a consumer that fails while processing a message sees it again next time
    mem = MemoryCheckpoint()
    with pytest.raises(RuntimeError):
        async with client.scanner("cp", checkpoint=mem) as s:
            async for m in s:
                if m == expected[4]:
                    raise RuntimeError("crash while processing")
    assert mem.positions["cp"] == Position(expected[4].offset, expected[4].delta)
    assert (await scan(client, "cp", checkpoint=mem))[0] == expected[4]
    with pytest.raises(CheckpointError):
        await scan(client, "other", checkpoint=cp)


async def test_retention_policy(
        tg: anyio.abc.TaskGroup, tmp_path: Path, anyio_backend_name: str) -> None:
    srv = new_server(anyio_backend_name, tg, tmp_path / "d", partition_size=200, partitions=2)
    await srv.start()
    async with open_client(srv.addr, retry=FAST_RETRY) as c:
        for i in range(20):
            await c.batch("ret", [b"m%02d" % i + b"x" * 40])
        oldest = await c.oldest("ret")
        assert oldest is not None and oldest > 0
        cp = MemoryCheckpoint()
        cp.positions["ret"] = Position(0, 0)
        with pytest.raises(OffsetRemoved):
            await scan(c, "ret", checkpoint=cp)
        got = await scan(c, "ret", checkpoint=cp, on_removed="earliest")
        assert got[0].offset == oldest
        assert got[-1].body.startswith(b"m19")
        assert cp.positions["ret"].offset > oldest
    await srv.stop()


@virtual_or_scaled(0)
async def test_cancelled_next_consumes_nothing(client: Client, unit: float) -> None:
    async with client.scanner("cn", follow=True, wait_ms=int(1000 * unit)) as s:
        with anyio.move_on_after(3 * unit):
            await s.__anext__()  # nothing there yet: waits, then is cancelled
        await client.batch("cn", [b"x"])
        m = await s.__anext__()
        assert m.body == b"x"


# ---------------------------------------------------------------- review 2


@virtual_time(0.05)
@pytest.mark.parametrize("follow", [False, True])
async def test_read_size_is_capped_so_replies_fit_in_max_reply(
    server: LiveServer, follow: bool
) -> None:
    """Full single-message batches: 1000 of them would be ~64 MB, over this client's 256 KiB
    max_reply (BadReply, which follow mode retried forever)."""
    async with open_client(server.addr, retry=FAST_RETRY, max_reply=4 * 65536) as c:
        bodies = [b"%02d" % i + b"x" * 65000 for i in range(10)]
        for body in bodies:
            await c.batch("fat", [body])
        with anyio.fail_after(60):
            got = await scan(c, "fat", read_size=1000, follow=follow, limit=10 if follow else None)
        assert [m.body for m in got] == bodies


async def test_bad_reply_ends_follow_mode(tg: anyio.abc.TaskGroup) -> None:
    """Follow mode retries a lost connection forever, but not a server that sends junk."""
    conns: list[int] = []
    config = b"MaxBatchSize: 65536\r\n"

    async def junk(stream: anyio.abc.SocketStream) -> None:
        conns.append(1)
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(config), config))
            else:
                await stream.send(b"OK what\r\n")

    addr = await scripted_peer(tg, junk)
    async with open_client(addr, retry=FAST_RETRY) as c:
        with anyio.fail_after(60), pytest.raises(BadReply):
            await scan(c, "t", follow=True)
        assert len(conns) == 2  # CONFIG's connection, and the scanner's: not retried


async def test_read_size_halves_for_a_server_with_lower_max_messages(
        tg: anyio.abc.TaskGroup, tmp_path: Path, anyio_backend_name: str) -> None:
    srv = new_server(anyio_backend_name, tg, tmp_path / "d", max_messages=100)
    await srv.start()
    async with open_client(srv.addr, retry=FAST_RETRY) as c:
        expected = []
        for i in range(50):
            msgs = [b"%d.%d" % (i, j) for j in range(20)]
            await c.batch("lim", msgs)
            expected += msgs
        async with c.scanner("lim", read_size=5000) as s:
            got = [m.body async for m in s]
        assert got == expected
        assert s.read_size == 64  # 5000, capped to 4096 for max_reply, halved until the server took it
        stats = await c.stats()
        assert int(stats["errors.protocol"]) == 6  # refused once per halving, not once per read
        assert await scan(c, "lim", offset=0, read_size=5000, limit=1) != []  # READ as well as TAIL
    await srv.stop()


# ---------------------------------------------------------------- review 3: start resolution


class _FlakyLoad(MemoryCheckpoint):
    """A checkpoint whose first load fails (its database briefly down)."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    async def load(self, topic: str) -> Position | None:
        self.loads += 1
        if self.loads == 1:
            raise ConnectionError("db down")
        return await super().load(topic)


async def test_cancelled_first_next_still_starts_at_the_end(client: Client) -> None:
    """A first __anext__ cancelled while the start was resolved used to leave the scanner
    'started' at the oldest message."""
    await write_batches(client, "cs", [[b"old1"], [b"old2"]])
    async with client.scanner("cs", start="end") as s:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await s.__anext__()
        with anyio.fail_after(10):
            assert [m.body async for m in s] == []  # the old code yielded old1, old2


async def test_failed_checkpoint_load_is_resolved_again(client: Client) -> None:
    await write_batches(client, "fl", [[b"a"], [b"b"], [b"c"]])
    cp = _FlakyLoad()
    async with client.scanner("fl", start=Last(1), checkpoint=cp) as s:
        with pytest.raises(ConnectionError):
            await s.__anext__()
        assert (await s.__anext__()).body == b"c"
    assert cp.loads == 2


@virtual_time(0)
async def test_follow_retries_a_lost_connection_while_starting(tmp_path: Path, anyio_backend_name: str) -> None:
    """start='end' in follow mode with the server down: retried until it is back, not raised."""
    async with anyio.create_task_group() as tg:
        srv = new_server(anyio_backend_name, tg, tmp_path / "d")
        await srv.start()
        async with open_client(srv.addr, retry=FAST_RETRY) as c:
            await c.batch("fs", [b"old"])
            await c.supports_extensions()
            await c.max_batch_size()
            await srv.stop()
            resolved = anyio.Event()
            topics = c.topics

            async def topics_signalled() -> dict[str, tuple[int, int]]:
                heads = await topics()
                resolved.set()  # the follower has its head: what is written now is new
                return heads

            c.topics = topics_signalled  # type: ignore[method-assign]
            got: list[bytes] = []

            async def consume() -> None:
                async with c.scanner("fs", start="end", follow=True) as s:
                    got.append((await s.__anext__()).body)

            # A guard, not a timing: the restart's work in worker threads takes no virtual
            # time, so the clock runs through the scanner's backoff sleeps (at most 5 s each)
            # meanwhile; a guard of 60 virtual seconds was reached before some restarts ended.
            with anyio.fail_after(100_000):
                async with anyio.create_task_group() as inner:
                    inner.start_soon(consume)
                    # A virtual second of the server being down: the scanner's first attempts fail
                    # (the old code raised the first ConnectionLost out of __anext__ here).
                    await anyio.sleep(1.0)
                    await srv.start()
                    await resolved.wait()
                    await c.batch("fs", [b"new"])
            assert got == [b"new"]
            await srv.stop()


@pytest.mark.parametrize("new", [[b"n"], [b"n" * 500]], ids=["shorter", "not-a-batch-start"])
async def test_follow_fails_clearly_when_the_server_comes_back_with_a_shorter_log(
        tmp_path: Path, anyio_backend_name: str, new: list[bytes]) -> None:
    """The follower's position is past the head, or not a batch start, of the log the server
    came back with: it used to wait there forever without a word."""
    data = tmp_path / "d"
    caught: list[BaseException] = []
    at_head, failed = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        srv = new_server(anyio_backend_name, tg, data)
        await srv.start()
        async with open_client(srv.addr, retry=FAST_RETRY) as c:
            await write_batches(c, "sh", [[b"old0"], [b"old1"], [b"old2"]])

            async def reader() -> None:
                try:
                    async with c.scanner("sh", follow=True, wait_ms=100, poll_interval=0.05) as s:
                        async for m in s:
                            if m.body == b"old2":
                                at_head.set()
                except NotFound as exc:
                    caught.append(exc)
                    failed.set()

            async with anyio.create_task_group() as inner:
                inner.start_soon(reader)
                await at_head.wait()
                await srv.stop()
                await anyio.to_thread.run_sync(shutil.rmtree, data)
                await srv.start()
                await c.batch("sh", new)
                with anyio.fail_after(10):
                    await failed.wait()
        await srv.stop()
    assert "the server's log is shorter" in str(caught[0])
