"""Where a scanner starts: oldest, end, the last N messages, OFFSET:DELTA; tail(); past the end."""

from __future__ import annotations

from typing import Unpack

import anyio
import anyio.abc
import pytest

from logd_trio.client.checkpoint import MemoryCheckpoint, Position
from logd_trio.client.client import Client, open_client
from logd_trio.client.positions import END, OLDEST, Last, parse_start
from logd_trio.client.scanner import ScannerOptions
from logd_trio.core.errors import InvalidPosition, NotFound

from ..harness import FAST_RETRY
from .live import LiveServer

pytestmark = pytest.mark.anyio

BATCHES = [[b"a0", b"a1", b"a2"], [b"b0"], [b"c0", b"c1"], [b"d0", b"d1", b"d2", b"d3"]]
ALL = [m for b in BATCHES for m in b]


async def fill(client: Client, topic: str) -> None:
    for batch in BATCHES:
        await client.batch(topic, batch)


async def bodies(client: Client, topic: str, **kw: Unpack[ScannerOptions]) -> list[bytes]:
    async with client.scanner(topic, **kw) as s:
        return [m.body async for m in s]


def test_parse_start() -> None:
    assert parse_start("oldest") == OLDEST and parse_start("END") == END
    assert parse_start("-5") == Last(5)
    assert parse_start("120") == Position(120, 0)
    assert parse_start("120:14") == Position(120, 14)
    for bad in ("", "x", "-", "1:", ":2", "1:2:3", "-1:2"):
        with pytest.raises(ValueError, match="not a position"):
            parse_start(bad)
    with pytest.raises(ValueError):
        Last(-1)


@pytest.mark.parametrize("extensions", [None, False])
async def test_last_n_and_end(server: LiveServer, extensions: bool | None) -> None:
    """Also against a server treated as Go logd (no TOPICS): the end is found by reading."""
    async with open_client(server.addr, retry=FAST_RETRY, extensions=extensions) as client:
        await fill(client, "p")
        for n in (0, 1, 3, 4, 5, 10, 50):
            expected = ALL[len(ALL) - n:] if n else []
            assert await bodies(client, "p", start=Last(n)) == expected
        assert await bodies(client, "p", start=END) == []
        assert await bodies(client, "p", start=OLDEST) == ALL
        assert await bodies(client, "never-written", start=Last(3)) == []
        assert await bodies(client, "never-written", start=END) == []


async def test_tail_returns_the_last_messages(client: Client) -> None:
    await fill(client, "t")
    assert [m.body for m in await client.tail("t", 2)] == [b"d2", b"d3"]
    assert [m.body for m in await client.tail("t", 5)] == ALL[-5:]  # across batches
    assert [m.body for m in await client.tail("t", 100)] == ALL
    assert await client.tail("unknown", 3) == []


async def test_follow_from_the_end_sees_only_new_messages(client: Client, tg: anyio.abc.TaskGroup) -> None:
    await fill(client, "f")
    got: list[bytes] = []
    at_end = anyio.Event()
    topics = client.topics

    async def topics_then_signal() -> dict[str, tuple[int, int]]:
        heads = await topics()
        at_end.set()  # the follower took the head from this answer: what comes later is new
        return heads

    client.topics = topics_then_signal  # type: ignore[method-assign]

    async def follow() -> None:
        async with client.scanner("f", start=END, follow=True, limit=2, wait_ms=200) as s:
            async for m in s:
                got.append(m.body)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as inner:
            inner.start_soon(follow)
            await at_end.wait()
            await client.batch("f", [b"new1", b"new2"])
    assert got == [b"new1", b"new2"]


async def test_exact_offset_delta_as_read_n_prints_it(client: Client) -> None:
    await fill(client, "x")
    async with client.scanner("x") as s:
        msgs = [m async for m in s]
    middle = msgs[4]  # c0
    start = parse_start(f"{middle.offset}:{middle.delta}")
    assert await bodies(client, "x", start=start) == ALL[4:]
    inside = msgs[5]  # c1, inside its batch
    assert await bodies(client, "x", start=Position(inside.offset, inside.delta)) == ALL[5:]


async def test_a_delta_that_is_not_a_message_start_is_refused(client: Client) -> None:
    await fill(client, "dl")
    async with client.scanner("dl") as s:
        msgs = [m async for m in s]
    c1 = msgs[5]  # the second message of batch c
    with pytest.raises(InvalidPosition, match=rf"{c1.offset}:{c1.delta - 1} .* not where a message starts"):
        await bodies(client, "dl", start=Position(c1.offset, c1.delta - 1))
    cp = MemoryCheckpoint()  # a checkpoint holding a bad delta is refused too, not silently skipped past
    await cp.commit("dl", Position(c1.offset, c1.delta + 1))
    with pytest.raises(InvalidPosition):
        await bodies(client, "dl", checkpoint=cp)
    assert await bodies(client, "dl", start=Position(c1.offset, c1.delta)) == ALL[5:]


async def test_past_the_end_says_so(client: Client) -> None:
    await fill(client, "e")
    head = await client.head("e")
    assert head is not None
    with pytest.raises(NotFound, match=rf"past the end of topic 'e' \(head is {head}\)"):
        await bodies(client, "e", offset=head + 1000)
    with pytest.raises(NotFound, match="not the start of a batch"):
        await bodies(client, "e", offset=1)
    assert await bodies(client, "e", offset=head) == []  # the head itself: nothing yet


async def test_scanner_without_async_with_is_a_clear_error(client: Client) -> None:
    s = client.scanner("t")
    with pytest.raises(RuntimeError, match=r"async with client\.scanner"):
        async for _ in s:
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="either start or offset"):
        client.scanner("t", start=END, offset=0)
