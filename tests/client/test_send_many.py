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
from .live import scripted_peer, wait_all_tasks_blocked

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


async def test_send_many_closed_by_another_task_is_connection_lost(tg: anyio.abc.TaskGroup) -> None:
    # the writer's receiver closes the link (ack timeout, EOF) while its sender waits for room
    async def never_reads(stream: anyio.abc.SocketStream) -> None:
        await anyio.sleep_forever()

    address = await scripted_peer(tg, never_reads)
    conn = await connect(address, retry=FAST_RETRY)
    raw = conn.stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    outcome: list[BaseException] = []

    async def sender() -> None:
        try:
            await conn.send_many([b"x" * (4 << 20), b"y"])
        except Exception as exc:  # what it raised is the test's subject
            outcome.append(exc)

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as inner:
                inner.start_soon(sender)
                await wait_all_tasks_blocked()  # the sender waits for the socket to be writable
                await conn.aclose()
    finally:
        await conn.aclose()
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLost), outcome
    assert f"connection to {address}" in str(outcome[0]) and conn.closed


async def test_a_transport_error_without_text_is_named(tg: anyio.abc.TaskGroup) -> None:
    # anyio's ClosedResourceError and BrokenResourceError have an empty str
    async def idle(stream: anyio.abc.SocketStream) -> None:
        await anyio.sleep_forever()

    address = await scripted_peer(tg, idle)
    conn = await connect(address, retry=FAST_RETRY)
    await conn.aclose()
    with pytest.raises(ConnectionLost) as info:
        await conn.send(b"PING\r\n")
    assert str(info.value) == f"connection to {address} lost: ClosedResourceError"
