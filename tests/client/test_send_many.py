"""``Connection.send_many``: the writer's buffers (each batch's head and body) reach the peer
as their concatenation, in order, through partial writes and full socket buffers, with more
buffers than one ``sendmsg`` takes."""

from __future__ import annotations

import socket
import struct

import anyio
import anyio.abc
import pytest

from logd_trio.client.connection import IOV_BATCH
from logd_trio.client.transport import connect
from logd_trio.core.errors import ConnectionLost

from ..harness import FAST_RETRY
from .live import scripted_peer

pytestmark = pytest.mark.anyio


async def test_send_many_sends_the_concatenation_through_partial_writes(tg: anyio.abc.TaskGroup) -> None:
    # 3 * IOV_BATCH buffers of 1 to 4000 bytes (about 3 MB), one empty among them
    parts = [bytes([65 + i % 26]) * (1 + (i * 7919) % 4000) for i in range(3 * IOV_BATCH)]
    parts[7] = b""
    want = b"".join(parts)
    got = bytearray()
    received = anyio.Event()

    async def reader(stream: anyio.abc.SocketStream) -> None:
        while len(got) < len(want):
            got.extend(await stream.receive(4096))
        received.set()

    address = await scripted_peer(tg, reader)
    conn = await connect(address, retry=FAST_RETRY)
    try:
        raw = conn.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # partial sendmsg calls
        with anyio.fail_after(30):
            await conn.send_many(parts)
            await conn.send_many([b"after"])
            await received.wait()
    finally:
        await conn.aclose()
    assert bytes(got[: len(want)]) == want


async def test_send_many_on_a_closed_peer_is_connection_lost(tg: anyio.abc.TaskGroup) -> None:
    async def closer(stream: anyio.abc.SocketStream) -> None:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close

    address = await scripted_peer(tg, closer)
    conn = await connect(address, retry=FAST_RETRY)
    try:
        with anyio.fail_after(30), pytest.raises(ConnectionLost):
            while True:  # the reset shows on a later send
                await conn.send_many([b"x" * 65536, b"y" * 65536])
    finally:
        await conn.aclose()
    assert conn.closed
