"""A worker's client session in-process: a real socket pair, the owner's side absent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trio

from logd_trio.server.config import ServerConfig
from logd_trio.server.stats import Counters
from logd_trio.server.workers.heads import HeadTable, HeadWriter
from logd_trio.server.workers.session import Session
from logd_trio.server.workers.view import Views


@dataclass
class _Ctx:
    config: ServerConfig
    counters: Counters
    heads: HeadTable
    views: Views
    upstream_path: str


async def test_a_request_the_owner_cannot_be_reached_for_gets_one_err_line(tmp_path: Path) -> None:
    writer = HeadWriter(tmp_path / "h", 2)
    ctx = _Ctx(ServerConfig(), Counters(), HeadTable(tmp_path / "h"), Views(tmp_path),
               str(tmp_path / "no-such.sock"))
    a, b = trio.socket.socketpair()
    session = Session(a, "127.0.0.1", ctx)
    got = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await b.send(b"PING\r\nTOPICS\r\nPING\r\n")  # TOPICS is relayed: the owner's socket is gone
            b.shutdown(trio.socket.SHUT_WR)
            while chunk := await b.recv(4096):
                got += chunk
    b.close()
    ctx.views.close()
    ctx.heads.close()
    writer.close()
    assert bytes(got) == b"PONG\r\nERR unavailable: this worker process cannot reach the server now\r\n"
