"""Automatic failover with real etcd and real ``logd serve --etcd`` processes."""

from __future__ import annotations

from pathlib import Path

import trio

from ...etcd_harness import EtcdCluster
from .nodes import Node, cluster_view, wait_leader, write_some


async def test_three_nodes_elect_a_leader_that_takes_writes(nursery: trio.Nursery, tmp_path: Path,
                                                            etcd1: EtcdCluster) -> None:
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    leader = await wait_leader(nodes)
    replies = await write_some(leader, "t", [b"m%d" % i for i in range(20)])
    assert all(r.startswith(b"OK ") for _, r in replies), replies
    others = [n for n in nodes if n is not leader]
    for n in others:
        got = await write_some(n, "t", [b"x"])
        assert got[0][1].startswith(b"ERR not leader"), got
    v = await cluster_view(others[0])
    assert v["role"] == "follower" and v["leader"]["node"] == leader.name
    for n in nodes:
        await n.stop()
