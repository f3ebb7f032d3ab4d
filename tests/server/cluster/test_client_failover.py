"""The client side of a failover, against real ``logd serve --etcd`` processes: a following
Scanner of several hosts moves to another node when the one it reads from is killed, and a TLS
cluster works from the library and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from logd_trio.client.client import open_client
from logd_trio.client.failover import ClusterClient, FailoverWriter, Secure, find_leader
from logd_trio.core.tls import TLSFailed

from ...etcd_harness import EtcdCluster
from ...tlsfiles import Certs, make_certs
from .nodes import Node, wait_leader

Seen = list[tuple[int, int, bytes]]


async def whole_log(address: str, topic: str) -> Seen:
    async with open_client(address) as c, c.scanner(topic, read_size=500) as s:
        return [(m.offset, m.delta, m.body) async for m in s]


async def test_a_following_scanner_resumes_on_another_node_when_the_one_it_reads_from_is_killed(
        nursery: trio.Nursery, tmp_path: Path, etcd1: EtcdCluster) -> None:
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    await wait_leader(nodes, in_sync=3)
    hosts = [n.addr for n in nodes]
    async with FailoverWriter(hosts, "t", batch_size=400, timeout=3) as w:
        await w.write_many(b"one-%04d" % i for i in range(300))
    seen: Seen = []
    halfway = trio.Event()
    client = ClusterClient(hosts, request_timeout=10)

    async def read() -> None:
        async with client.scanner("t", follow=True, wait_ms=300, read_size=20, poll_interval=0.05) as s:
            async for m in s:
                seen.append((m.offset, m.delta, m.body))
                if len(seen) == 150:
                    halfway.set()

    async with client, trio.open_nursery() as inner:
        inner.start_soon(read)
        with trio.fail_after(20):
            await halfway.wait()
        victim = next(n for n in nodes if n.addr == client.chosen)
        assert victim is await wait_leader(nodes, in_sync=1)  # it read from the leader
        victim.kill()
        await victim.wait_dead()
        async with FailoverWriter(hosts, "t", batch_size=400, timeout=3, give_up=30) as w:
            await w.write_many(b"two-%04d" % i for i in range(300))  # to the new leader (at least once)
        new = await wait_leader(nodes, in_sync=2)
        expected = await whole_log(new.addr, "t")
        with trio.fail_after(30):
            while len(seen) < len(expected):  # noqa: ASYNC110 (the reader appends)
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # nothing more comes
        inner.cancel_scope.cancel()
    assert client.chosen != victim.addr and client.switches >= 1
    assert len(seen) == len(expected) and seen == expected  # every message once, in order: no gap, no duplicate
    assert {b for _, _, b in expected} >= {b"one-%04d" % i for i in range(300)} | {b"two-%04d" % i for i in range(300)}
    for n in nodes:
        if n is not victim:
            await n.stop()


async def test_logd_read_follow_with_several_hosts_keeps_reading_when_its_node_is_killed(
        nursery: trio.Nursery, tmp_path: Path, etcd1: EtcdCluster) -> None:
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    leader = await wait_leader(nodes, in_sync=3)
    hosts = [n.addr for n in nodes]
    async with FailoverWriter(hosts, "t", batch_size=400, timeout=3) as w:
        await w.write_many(b"one-%04d" % i for i in range(200))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "logd_trio_cli.main", "read", "--follow", "--host", ",".join(hosts), "--topic", "t",
         "--format", "{offset}:{delta} {body}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = bytearray()

    async def lines_at_least(n: int) -> None:
        assert proc.stdout is not None
        with trio.fail_after(30):
            while out.count(b"\n") < n:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, "logd read ended"
                out.extend(chunk)

    try:
        await lines_at_least(200)  # it reads from the leader (found with CLUSTER)
        leader.kill()
        await leader.wait_dead()
        async with FailoverWriter(hosts, "t", batch_size=400, timeout=3, give_up=30) as w:
            await w.write_many(b"two-%04d" % i for i in range(200))
        new = await wait_leader(nodes, in_sync=2)
        expected = [b"%d:%d %s" % m for m in await whole_log(new.addr, "t")]
        await lines_at_least(len(expected))
    finally:
        proc.kill()
        await proc.wait()
    assert out.splitlines() == expected  # no gap, no duplicate, across the failover
    for n in nodes:
        if n is not leader:
            await n.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def test_a_tls_cluster_from_the_library_and_the_cli(nursery: trio.Nursery, tmp_path: Path, etcd1: EtcdCluster,
                                                          certs: Certs) -> None:
    tls = ("--tls-cert", certs.server.cert, "--tls-key", certs.server.key, "--replicate-ca", certs.ca)
    nodes = [await Node(n, tmp_path / n, etcd1, extra=tls).start(nursery) for n in "abc"]
    hosts = [n.addr for n in nodes]
    secure = Secure(certs.context())
    with trio.fail_after(20):
        while (leader := await find_leader(hosts, per_node=1.0, secure=secure)) is None:  # noqa: ASYNC110
            await trio.sleep(0.1)
    with pytest.raises(TLSFailed):  # every node refuses a client that does not trust it: said, not retried
        await find_leader(hosts, per_node=1.0, secure=Secure(certs.context(ca=certs.other_ca)))
    followers = [h for h in hosts if h != leader]
    async with FailoverWriter([*followers, leader], "t", batch_size=300, secure=secure) as w:  # asks over TLS
        await w.write_many(b"lib-%03d" % i for i in range(100))
    assert w.failovers == 0
    cli = [sys.executable, "-m", "logd_trio_cli.main"]
    flags = ["--host", ",".join(hosts), "--tls-ca", certs.ca, "--topic", "t"]
    lines = b"".join(b"cli-%03d\n" % i for i in range(100))
    done = await trio.run_process([*cli, "write", *flags, "-q"], stdin=lines, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr
    with trio.fail_after(20):
        while True:  # acknowledged with --acks all: every in-sync node has it; the reader may ask any
            out = await trio.run_process([*cli, "read", *flags], capture_stdout=True, capture_stderr=True,
                                         check=False)
            assert out.returncode == 0, out.stderr
            if len(out.stdout.splitlines()) >= 200:
                break
            await trio.sleep(0.1)
    assert out.stdout.splitlines() == [b"lib-%03d" % i for i in range(100)] + lines.splitlines()
    shown = await trio.run_process([*cli, "cluster", "--host", ",".join(hosts), "--tls-ca", certs.ca, "--json"],
                                   capture_stdout=True, capture_stderr=True, check=False)
    assert shown.returncode == 0, shown.stderr
    assert [v["role"] for v in json.loads(shown.stdout).values()].count("leader") == 1
    plain = await trio.run_process([*cli, "read", "--host", ",".join(hosts), "--topic", "t", "--retries", "1",
                                    "--timeout", "2s"], capture_stdout=True, capture_stderr=True, check=False)
    assert plain.returncode != 0  # no TLS against TLS nodes: refused, not a hang
    for n in nodes:
        await n.stop()
