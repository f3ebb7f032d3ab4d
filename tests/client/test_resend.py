"""Opt-in resend of unacknowledged batches after a reconnect (at-least-once)."""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import pytest

from logd_trio.client.client import Client, Connection, open_client
from logd_trio.core.errors import ConnectionLost, Timeout, WriteFailed
from logd_trio.core.framing import iter_messages

from ..harness import FAST_RETRY
from .live import read_body, read_line, scripted_peer, virtual_or_scaled

pytestmark = pytest.mark.anyio

CONFIG = b"MaxBatchSize: 1000\r\n"


def dropping_peer(drops: int, stored: list[bytes]) -> tuple[list[int], object]:
    """A peer whose first ``drops`` connections that send a batch take it and close without
    answering; returns the count of connections that sent a batch, and the handler."""
    connections = [0]

    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        offset = 0
        drop: bool | None = None
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(CONFIG), CONFIG))
                continue
            if drop is None:
                connections[0] += 1
                drop = connections[0] <= drops
            size = int(line.split()[1])
            body = bytes(buf[:size]) if len(buf) >= size else None
            await read_body(stream, buf, size)
            if drop:
                return  # the connection closes: the batch's outcome is unknown to the writer
            stored.append(body or b"")
            await stream.send(b"OK %d 1\r\n" % offset)
            offset += len(line) + 2 + size

    return connections, peer


async def test_unacknowledged_batches_are_resent_after_a_reconnect(tg: anyio.abc.TaskGroup) -> None:
    stored: list[bytes] = []
    connections, peer = dropping_peer(1, stored)
    addr = await scripted_peer(tg, peer)  # type: ignore[arg-type]
    async with open_client(addr, retry=FAST_RETRY) as c, c.writer("t", resend=True) as w:
        await w.write(b"kept")
        await w.flush()
        assert w.failed == [] and w.acked_messages == 1
    assert connections[0] == 2 and len(stored) == 1 and b"kept" in stored[0]


async def test_without_resend_the_batch_fails(tg: anyio.abc.TaskGroup) -> None:
    stored: list[bytes] = []
    _, peer = dropping_peer(1, stored)
    addr = await scripted_peer(tg, peer)  # type: ignore[arg-type]
    async with open_client(addr, retry=FAST_RETRY) as c:
        with pytest.raises(WriteFailed):
            async with c.writer("t") as w:
                await w.write(b"lost?")
        assert len(w.failed) == 1 and isinstance(w.failed[0].error, ConnectionLost)


async def test_resend_gives_up_after_its_attempts(tg: anyio.abc.TaskGroup) -> None:
    stored: list[bytes] = []
    connections, peer = dropping_peer(100, stored)
    addr = await scripted_peer(tg, peer)  # type: ignore[arg-type]
    async with open_client(addr, retry=FAST_RETRY) as c:
        with pytest.raises(WriteFailed):
            async with c.writer("t", resend=True) as w:
                await w.write(b"x")
        assert len(w.failed) == 1 and isinstance(w.failed[0].error, ConnectionLost)
    assert connections[0] == 3  # sent three times in all, then given up


class SmallSendBuffer(Client):
    """A client whose connections have a 4 KiB send buffer: a peer that does not read soon
    leaves the writer's sender waiting for the socket to be writable."""

    async def connect(self) -> Connection:
        conn = await super().connect()
        raw = conn.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return conn


def deaf_then_storing_peer(stored: list[bytes]) -> tuple[list[int], object]:
    """A peer whose first connection that sends a batch then reads nothing more (a stalled
    server); the later ones store every batch and acknowledge it.  Returns the count of
    connections that sent a batch, and the handler."""
    connections = [0]

    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        offset = 0
        deaf: bool | None = None
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(BIG_CONFIG), BIG_CONFIG))
                continue
            if deaf is None:
                connections[0] += 1
                deaf = connections[0] == 1
            if deaf:
                await anyio.sleep_forever()
            size = int(line.split()[1])
            while len(buf) < size:
                buf += await stream.receive(65536)
            stored.append(bytes(buf[:size]))
            del buf[:size]
            await stream.send(b"OK %d 1\r\n" % offset)
            offset += len(line) + 2 + size

    return connections, peer


BIG_CONFIG = b"MaxBatchSize: 65536\r\n"
MANY = [b"%04d" % i + b"m" * 996 for i in range(2000)]  # 2 MB: far more than the socket buffers hold


@virtual_or_scaled()
async def test_ack_timeout_while_the_sender_waits_fails_the_batches(tg: anyio.abc.TaskGroup, unit: float) -> None:
    """The receiver closes the link on the ack timeout while the sender waits for room: the
    batches fail with Timeout (the writer does not crash)."""
    stored: list[bytes] = []
    _, peer = deaf_then_storing_peer(stored)
    addr = await scripted_peer(tg, peer)  # type: ignore[arg-type]
    client = SmallSendBuffer(addr, retry=FAST_RETRY, extensions=False)
    try:
        with anyio.fail_after(60), pytest.raises(WriteFailed) as info:
            async with client.writer("t", batch_size=16384, ack_timeout=2 * unit) as w:
                await w.write_many(MANY)
                await w.flush()
    finally:
        await client.aclose()
    failed = w.failed
    assert info.value.failed == failed and all(isinstance(b.error, Timeout) for b in failed)
    # the later batches went on a new connection; each message either failed or is stored, once
    got = [m for body in stored for _, m in iter_messages(body)]
    assert sorted([m for b in failed for m in b.messages()] + got) == MANY


@virtual_or_scaled()
async def test_resend_after_an_ack_timeout_while_the_sender_waits(tg: anyio.abc.TaskGroup, unit: float) -> None:
    """The same with ``resend=True``: the batches go again on a new connection, none lost."""
    stored: list[bytes] = []
    connections, peer = deaf_then_storing_peer(stored)
    addr = await scripted_peer(tg, peer)  # type: ignore[arg-type]
    client = SmallSendBuffer(addr, retry=FAST_RETRY, extensions=False)
    try:
        with anyio.fail_after(60):
            async with client.writer("t", batch_size=16384, ack_timeout=2 * unit, resend=True) as w:
                await w.write_many(MANY)
                await w.flush()
    finally:
        await client.aclose()
    assert w.failed == [] and w.acked_messages == len(MANY) and connections[0] == 2
    got = [m for body in stored for _, m in iter_messages(body)]
    assert sorted(set(got)) == MANY  # at least once, each intact
