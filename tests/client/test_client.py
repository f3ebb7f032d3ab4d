"""Client against a real server on port 0 (and, where Go behaviour is the point,
a tiny scripted peer that answers like Go logd does)."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest

from logd_trio.client.client import Client, open_client, parse_address
from logd_trio.core.errors import (
    BadReply,
    ChecksumMismatch,
    ConnectionLost,
    InvalidRequest,
    InvalidTopic,
    MessageTooLarge,
    NotFound,
    Timeout,
    TopicNotAllowed,
    Unsupported,
)
from logd_trio.core.framing import build_body, build_frame

from ..harness import FAST_RETRY
from .live import (
    LiveServer,
    elapsed_ok,
    new_server,
    read_line,
    scripted_peer,
    virtual_or_scaled,
)
from .ports import refused_address

# ---------------------------------------------------------------- tests

pytestmark = pytest.mark.anyio


def test_parse_address() -> None:
    assert parse_address("h:1") == ("h", 1)
    assert parse_address("h") == ("h", 1774)
    assert parse_address(":9") == ("127.0.0.1", 9)
    assert parse_address("[::1]:5") == ("::1", 5)
    with pytest.raises(ValueError):
        parse_address("h:x")


async def test_batch_read_tail_offsets(client: Client) -> None:
    o1 = await client.batch("t", [b"hello", b"world"])
    o2 = await client.batch("t", [b"third"])
    o3 = await client.batch("t", [b"a", b"bb", b"ccc"])
    f1 = build_frame("t", build_body([b"hello", b"world"]), 2)
    f2 = build_frame("t", build_body([b"third"]), 1)
    assert (o1, o2, o3) == (0, len(f1), len(f1) + len(f2))
    r = await client.read("t", 0, 50000)
    assert [b.offset for b in r.batches] == [o1, o2, o3]
    got = [(m.offset, m.delta, m.body) for m in r]
    assert got == [(o1, 0, b"hello"), (o1, 14, b"world"), (o2, 0, b"third"),
                   (o3, 0, b"a"), (o3, 10, b"bb"), (o3, 21, b"ccc")]
    # a read from the middle computes the same offsets
    r2 = await client.read("t", o2, 2)
    assert [b.offset for b in r2.batches] == [o2, o3]
    t = await client.read_oldest("t", 1)
    assert t.offset == 0 and len(t.batches) == 1
    with pytest.raises(NotFound):
        await client.read("t", r.next_offset, 1)  # the head
    with pytest.raises(NotFound):
        await client.read("t", 1, 1)  # inside a batch
    with pytest.raises(NotFound):
        await client.read_oldest("nothing-here", 1)
    with pytest.raises(InvalidRequest):
        await client.read("t", 0, 0)
    with pytest.raises(InvalidTopic):
        await client.read("../x", 0, 1)  # refused before sending
    assert await client.oldest("t") == 0
    assert await client.oldest("nothing-here") is None
    assert await client.head("t") == r.next_offset


async def test_info_requests(client: Client, server: LiveServer) -> None:
    info = await client.config()
    assert info.max_batch_size == 65536
    assert client.server_info == info
    stats = await client.stats()
    assert "requests.total" in stats
    await client.batch("x", [b"1"])
    assert (await client.topics())["x"] == (0, len(build_frame("x", build_body([b"1"]), 1)))
    assert await client.supports_extensions()
    assert await client.ping() >= 0


async def test_topic_not_allowed(
        tg: anyio.abc.TaskGroup, tmp_path: Path, anyio_backend_name: str) -> None:
    srv = new_server(anyio_backend_name, tg, tmp_path / "d", topics_whitelist=("ok",))
    await srv.start()
    async with open_client(srv.addr) as c:
        with pytest.raises(TopicNotAllowed):
            await c.batch("nope", [b"x"])
        assert await c.batch("ok", [b"x"]) == 0
    await srv.stop()


async def test_nothing_listening_is_connection_lost() -> None:
    with refused_address() as addr:
        async with open_client(addr, retry=FAST_RETRY) as c:
            with pytest.raises(ConnectionLost, match="cannot connect"):
                await c.stats()


async def test_reconnects_after_server_restart(client: Client, server: LiveServer) -> None:
    await client.batch("r", [b"before"])
    await server.stop()
    with pytest.raises(ConnectionLost):
        await client.read("r", 0, 1)
    await server.start()
    # a stale connection is detected and replaced: no error for idempotent requests
    assert [m.body for m in await client.read("r", 0, 1)] == [b"before"]
    assert await client.batch("r", [b"after"]) > 0


@virtual_or_scaled(0)
async def test_request_timeout_and_cancellation_drop_the_connection(
    tg: anyio.abc.TaskGroup, unit: float
) -> None:
    accepted = []

    async def silent(stream: anyio.abc.SocketStream) -> None:
        accepted.append(stream)
        await anyio.sleep_forever()

    addr = await scripted_peer(tg, silent)
    async with open_client(addr, request_timeout=2 * unit) as c:
        start = anyio.current_time()
        with pytest.raises(Timeout):
            await c.stats()
        assert elapsed_ok(anyio.current_time() - start, 2 * unit, 0.01)
        with anyio.move_on_after(unit):
            await c.stats()
        assert len(accepted) == 2  # the timed-out connection was not reused
        with pytest.raises(Timeout):
            await c.stats()
        assert len(accepted) == 3


async def test_go_like_server_without_extensions(tg: anyio.abc.TaskGroup) -> None:
    """Go logd closes the connection on an unknown command; the client falls back."""
    config = b"Host: go\r\nTimeout: 15s\r\nIdleTimeout: 30s\r\nMaxBatchSize: 1000\r\n"

    async def go(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(config), config))
            else:
                await stream.aclose()
                return

    addr = await scripted_peer(tg, go)
    async with open_client(addr, retry=FAST_RETRY) as c:
        assert not await c.supports_extensions()
        assert await c.ping() >= 0  # via CONFIG
        assert (await c.config()).max_batch_size == 1000
        with pytest.raises(Unsupported):
            await c.topics()
        assert await c.head("t") is None


async def test_corrupt_and_bad_replies(tg: anyio.abc.TaskGroup) -> None:
    body = build_body([b"hello"])
    replies = {
        b"READ t 0 1": b"OK 0 1\r\nBATCH %d t 12345 1\r\n%s" % (len(body), body),
        b"STATS": b"garbage\r\n",
    }

    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            await stream.send(replies[line])

    addr = await scripted_peer(tg, peer)
    async with open_client(addr, retry=FAST_RETRY) as c:
        with pytest.raises(ChecksumMismatch):
            await c.read("t", 0, 1)
        with pytest.raises(BadReply):
            await c.stats()


# ---------------------------------------------------------------- review 2


async def test_batch_over_the_server_max_is_refused_before_sending(client: Client) -> None:
    with pytest.raises(MessageTooLarge, match="at most 65536"):
        await client.batch("big", [b"z" * 70_000])
    with pytest.raises(MessageTooLarge):
        await client.batch("big", [b"z" * 30_000, b"z" * 40_000])
    # exactly the maximum goes through, and the connection is fine
    overhead = len(b"BATCH 65495 big 1234567890 1\r\nMSG 65482\r\n\r\n")
    assert await client.batch("big", [b"y" * (65536 - overhead)]) == 0
    assert await client.batch("big", [b"ok"]) == 65536
    assert (await client.stats())["requests.batch"] == "2"


async def test_head_of_an_unknown_topic_is_none(client: Client) -> None:
    assert await client.head("nothing-here") is None
    await client.batch("here", [b"x"])
    assert await client.head("here") == len(build_frame("here", build_body([b"x"]), 1))


async def test_extension_probe_does_not_cache_a_lost_connection(tg: anyio.abc.TaskGroup) -> None:
    """Connections dropped during the probe are not a "no"; Go's close-on-PING, twice, is."""
    config = b"MaxBatchSize: 1000\r\n"
    conns: list[int] = []

    async def flaky(stream: anyio.abc.SocketStream) -> None:
        conns.append(1)
        n = len(conns)
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            if n == 1:  # dropped before answering anything
                return
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(config), config))
            elif line == b"PING" and n == 2:  # dropped just after CONFIG was answered
                return
            elif line == b"PING":
                await stream.send(b"PONG\r\n")

    addr = await scripted_peer(tg, flaky)
    async with open_client(addr, retry=FAST_RETRY) as c:
        with pytest.raises(ConnectionLost):
            await c.supports_extensions()
        assert await c.supports_extensions()  # asked again: connection 2 drops at PING, 3 answers
        assert len(conns) == 3
        assert c.server_info is not None and c.server_info.max_batch_size == 1000  # learned on the way
        assert await c.supports_extensions() and len(conns) == 3  # cached


async def test_bad_reply_is_not_retried(tg: anyio.abc.TaskGroup) -> None:
    conns: list[int] = []

    async def junk(stream: anyio.abc.SocketStream) -> None:
        conns.append(1)
        buf = bytearray()
        while await read_line(stream, buf) is not None:
            await stream.send(b"WHAT\r\n")

    addr = await scripted_peer(tg, junk)
    async with open_client(addr, retry=FAST_RETRY) as c:
        with pytest.raises(BadReply):
            await c.stats()
        assert len(conns) == 1  # not sent again on a new connection
