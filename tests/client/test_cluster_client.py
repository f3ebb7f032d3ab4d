"""ClusterClient against real servers: its connections stay on one node, move to another when that
one goes, and a following Scanner resumes there at its next offset, waiting (``settle``) while the
new node does not serve that offset yet."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest

from logd_trio.client.client import open_client
from logd_trio.client.failover import ClusterClient, FailoverWriter, Secure, find_leader
from logd_trio.core.errors import ConnectionLost, NotFound, WriteFailed
from logd_trio.server.auth import hash_token

from ..harness import FAST_RETRY
from .live import new_server

pytestmark = pytest.mark.anyio

BATCHES = [[b"m%02d" % i] for i in range(12)]


async def write(addr: str, batches: list[list[bytes]]) -> None:
    async with open_client(addr, retry=FAST_RETRY) as c:
        for b in batches:
            await c.batch("t", b)


@pytest.mark.parametrize("settle", [10.0, 0.0], ids=["settles", "no-settle"])
async def test_a_following_scanner_moves_to_a_node_that_catches_up_with_its_position(
        tmp_path: Path, anyio_backend_name: str, tg: anyio.abc.TaskGroup, settle: float) -> None:
    """x holds 10 batches, y (behind) 5: the scanner read all of x; x goes; on y its position is past
    the head until y gets the rest.  It waits for that (without ``settle`` it says NotFound at once)."""
    x, y = new_server(anyio_backend_name, tg, tmp_path / "x"), new_server(anyio_backend_name, tg, tmp_path / "y")
    await x.start()
    await y.start()
    await write(x.addr, BATCHES[:10])
    await write(y.addr, BATCHES[:5])
    client = ClusterClient([x.addr, y.addr], request_timeout=5, settle=settle, leader_wait=0.5)
    got: list[bytes] = []
    async with client, client.scanner("t", follow=True, wait_ms=200, poll_interval=0.05) as s:
        it = s.__aiter__()
        for _ in range(10):
            got.append((await it.__anext__()).body)
        assert client.chosen == x.addr  # the first that leads (a single server leads itself)
        await x.stop()

        async def catch_up() -> None:
            await anyio.sleep(0.5)
            await write(y.addr, BATCHES[5:])

        tg.start_soon(catch_up)
        with anyio.fail_after(15):
            if settle == 0:
                with pytest.raises(NotFound, match="past the end"):
                    await it.__anext__()
                return
            for _ in range(2):
                got.append((await it.__anext__()).body)
    assert got == [m for b in BATCHES for m in b]  # no gap, no duplicate
    assert client.chosen == y.addr and client.switches == 1
    await y.stop()


async def test_no_node_answering_is_connection_lost_within_give_up() -> None:
    listeners = [await anyio.create_tcp_listener(local_host="127.0.0.1") for _ in range(2)]
    addrs = [f"127.0.0.1:{ln.extra(anyio.abc.SocketAttribute.local_port)}" for ln in listeners]
    for ln in listeners:
        await ln.aclose()  # nothing listens there any more
    client = ClusterClient(addrs, give_up=0.5)
    start = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(ConnectionLost, match="no node of"):
        await client.ping()
    assert anyio.current_time() - start < 3


async def test_the_token_goes_to_every_node_with_the_cluster_clients(
        tmp_path: Path, anyio_backend_name: str, tg: anyio.abc.TaskGroup) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[principals.app]\ntoken = "{hash_token("app-token-1")}"\nread = ["*"]\nwrite = ["t"]\n')
    srv = new_server(anyio_backend_name, tg, tmp_path / "d", auth_file=str(auth))
    await srv.start()
    secure = Secure(token="app-token-1")
    assert await find_leader([srv.addr], secure=secure) == srv.addr
    with pytest.raises(WriteFailed, match="not allowed"):  # no token: refused, final
        async with FailoverWriter([srv.addr], "t") as w:
            await w.write_many([b"x"])
    async with FailoverWriter([srv.addr], "t", secure=secure) as w:
        await w.write_many([b"a", b"b"])
    async with ClusterClient([srv.addr], secure=secure) as client, client.scanner("t") as s:
        assert [m.body async for m in s] == [b"a", b"b"]
    await srv.stop()
