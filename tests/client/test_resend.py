"""Opt-in resend of unacknowledged batches after a reconnect (at-least-once)."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from logd_trio.client.client import open_client
from logd_trio.core.errors import ConnectionLost, WriteFailed

from ..harness import FAST_RETRY
from .live import read_body, read_line, scripted_peer

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
