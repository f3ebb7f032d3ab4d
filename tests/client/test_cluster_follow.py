"""A following reader of a cluster (ClusterClient): it leaves a node that stops answering (paused,
partitioned: the kernel still accepts its connections), and it reads from the leader only,
waiting for one while there is none."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import anyio
import anyio.abc
import pytest
import trio

from logd_trio.client.client import RetryPolicy, open_client
from logd_trio.client.cluster_client import REQUEST_TIMEOUT, ClusterClient
from logd_trio.client.failover import Secure
from logd_trio.core.errors import ConnectionLost
from logd_trio.core.tls import TLSFailed

from ..etcd_harness import TcpProxy
from ..harness import FAST_RETRY
from ..tlsfiles import make_certs
from .live import InLoopServer, LiveServer, new_server

pytestmark = pytest.mark.anyio

BATCHES = [[b"m%02d" % i] for i in range(12)]
QUICK = RetryPolicy(attempts=1, initial=0.05, maximum=0.05, connect_timeout=0.5)


async def write(addr: str, batches: list[list[bytes]]) -> None:
    async with open_client(addr, retry=FAST_RETRY) as c:
        for b in batches:
            await c.batch("t", b)


async def stat(server: LiveServer, key: str) -> int:
    async with open_client(server.addr, retry=FAST_RETRY) as c:
        return int((await c.stats())[key])


async def others(server: LiveServer) -> int:
    """How many requests the server got, STATS not counted (CLUSTER has no counter of its own)."""
    async with open_client(server.addr, retry=FAST_RETRY) as c:
        stats = await c.stats()
    return int(stats["requests.total"]) - int(stats["requests.stats"])


def test_a_cluster_request_has_a_deadline_by_default() -> None:
    assert ClusterClient(["127.0.0.1:1"]).request_timeout == REQUEST_TIMEOUT
    assert ClusterClient(["127.0.0.1:1"], request_timeout=3).request_timeout == 3


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_following_reader_leaves_a_node_that_stops_answering(
        tmp_path: Path, tg: anyio.abc.TaskGroup, anyio_backend: str) -> None:
    """x (behind a proxy) and y hold the same 6 batches; the reader follows x; the proxy freezes
    (x paused: connections stay open, nothing comes back); y gets 6 more: the reader's long poll
    times out, it finds y and reads on at its next offset (no gap, no duplicate)."""
    x, y = new_server("trio", tg, tmp_path / "x"), new_server("trio", tg, tmp_path / "y")
    await x.start()
    await y.start()
    for node in (x, y):
        await write(node.addr, BATCHES[:6])
    async with trio.open_nursery() as nursery:
        proxy = TcpProxy(int(x.addr.rsplit(":", 1)[1]))
        await proxy.start(nursery)
        px = f"127.0.0.1:{proxy.port}"
        client = ClusterClient([px, y.addr], request_timeout=1.0, retry=QUICK)
        got: list[bytes] = []
        async with client, client.scanner("t", follow=True, wait_ms=200, poll_interval=0.05) as s:
            it = s.__aiter__()
            for _ in range(6):
                got.append((await it.__anext__()).body)
            assert client.chosen == px
            proxy.freeze()
            await write(y.addr, BATCHES[6:])
            with anyio.fail_after(20):
                for _ in range(6):
                    got.append((await it.__anext__()).body)
        assert got == [m for b in BATCHES for m in b]
        assert client.chosen == y.addr
        proxy.thaw()
        nursery.cancel_scope.cancel()
    await x.stop()
    await y.stop()


async def test_a_tls_node_that_never_handshakes_is_unreachable_not_a_refusal(
        tmp_path: Path, anyio_backend_name: str, tg: anyio.abc.TaskGroup) -> None:
    """The chosen node accepts TCP (its kernel) but never answers the handshake: the client moves to
    another node; with no other node it is ConnectionLost after give_up, not a TLS refusal."""
    certs = make_certs(tmp_path / "c")
    srv = new_server(anyio_backend_name, tg, tmp_path / "d", tls_cert=certs.server.cert, tls_key=certs.server.key)
    await srv.start()
    secure = Secure(certs.context())
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(8)  # never accepted: like a SIGSTOPped node
        paused = f"127.0.0.1:{stuck.getsockname()[1]}"
        client = ClusterClient([paused, srv.addr], secure=secure, retry=QUICK, give_up=5)
        client.chosen = paused  # it was reading there when the node was paused
        with anyio.fail_after(10):
            async with client:
                await client.ping()
        assert client.chosen == srv.addr
        alone = ClusterClient([paused], secure=secure, retry=QUICK, give_up=1.0)
        with anyio.fail_after(10), pytest.raises(ConnectionLost, match="no node of") as caught:
            await alone.ping()
        assert not isinstance(caught.value, TLSFailed)
    await srv.stop()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_following_reader_reads_from_the_leader_only_and_waits_for_one(
        tmp_path: Path, tg: anyio.abc.TaskGroup, anyio_backend: str) -> None:
    """f copies l; l goes: the reader (f listed first) does not read from f but waits; l comes back
    on its address: the reader reads everything from l, f served it no READ."""
    leader = new_server("trio", tg, tmp_path / "l")
    await leader.start()
    await write(leader.addr, BATCHES[:6])
    async with open_client(leader.addr, retry=FAST_RETRY) as c:
        head = (await c.topics())["t"][1]
    follower = new_server("trio", tg, tmp_path / "f", node_id="f", replicate_from=leader.addr,
                          fsync="always")
    await follower.start()
    with anyio.fail_after(10):
        async with open_client(follower.addr, retry=FAST_RETRY) as c:
            while (await c.topics()).get("t", (0, 0))[1] < head:  # noqa: ASYNC110  (f copied the 6 batches)
                await anyio.sleep(0.02)
    await leader.stop()
    client = ClusterClient([follower.addr, leader.addr], retry=QUICK, give_up=1.0, request_timeout=5)
    got: list[bytes] = []
    done = anyio.Event()
    async with client, client.scanner("t", follow=True, wait_ms=200, poll_interval=0.05) as s:

        async def read() -> None:
            async for m in s:
                got.append(m.body)
                if len(got) == 6:
                    done.set()
                    return

        tg.start_soon(read)
        asked = await others(follower)
        with anyio.fail_after(10):
            while await others(follower) < asked + 2:  # noqa: ASYNC110  (the reader looked)
                await anyio.sleep(0.02)
        await leader.start()
        with anyio.fail_after(15):
            await done.wait()
    assert got == [m for b in BATCHES[:6] for m in b]
    assert client.chosen == leader.addr
    assert await stat(follower, "requests.read") == 0
    await follower.stop()
    await leader.stop()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_following_reader_leaves_a_node_that_comes_back_as_a_follower(
        tmp_path: Path, tg: anyio.abc.TaskGroup, anyio_backend: str) -> None:
    """x and y hold the same 6 batches; the reader follows x; x restarts, following y (it answers on
    its address again): the reader goes on at y, the leader, and reads nothing from x."""
    x, y = InLoopServer(tg, tmp_path / "x"), InLoopServer(tg, tmp_path / "y")
    await x.start()
    await y.start()
    for node in (x, y):
        await write(node.addr, BATCHES[:6])
    client = ClusterClient([x.addr, y.addr], request_timeout=5, retry=QUICK, give_up=5)
    got: list[bytes] = []
    async with client, client.scanner("t", follow=True, wait_ms=200, poll_interval=0.05) as s:
        it = s.__aiter__()
        for _ in range(6):
            got.append((await it.__anext__()).body)
        assert client.chosen == x.addr
        await x.stop()
        x.config = dataclasses.replace(x.config, node_id="x", replicate_from=y.addr, fsync="always")
        await x.start()  # the same address, now a follower
        await write(y.addr, BATCHES[6:])
        with anyio.fail_after(15):
            for _ in range(6):
                got.append((await it.__anext__()).body)
    assert got == [m for b in BATCHES for m in b]
    assert client.chosen == y.addr
    assert await stat(x, "requests.read") == 0  # (counted since its restart)
    await x.stop()
    await y.stop()
