"""ClusterNode: nodes in one process against a real etcd; partitions through a proxy."""

from __future__ import annotations

from collections.abc import Callable

import trio

from logd_trio.server.cluster.election import ClusterKeys, Member
from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.node import ClusterNode, ClusterView

from ...etcd_harness import EtcdCluster, TcpProxy

PORTS = {"a": 1774, "b": 1775, "c": 1776}


class Changes:
    """Wakes waiters at every view change of any node."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self.log: list[tuple[float, str, ClusterView]] = []

    def callback(self, node: str) -> Callable[[ClusterView], None]:
        def on_change(view: ClusterView) -> None:
            self.log.append((trio.current_time(), node, view))
            self._event.set()
            self._event = trio.Event()
        return on_change

    async def until(self, condition: Callable[[], bool]) -> None:
        """Until ``condition`` holds (the tests bound every wait with fail_after)."""
        while not condition():
            await self._event.wait()


async def until_true(condition: Callable[[], bool]) -> None:
    """For conditions no event announces (a lease deadline passing or a keepalive landing)."""
    while not condition():  # noqa: ASYNC110 -- polled: no event exists for it
        await trio.sleep(0.01)


def leaders(nodes: list[ClusterNode]) -> list[ClusterNode]:
    return [n for n in nodes if n.view.role == "leader"]


def start_node(nursery: trio.Nursery, etcd: EtcdClient, keys: ClusterKeys, name: str,
               changes: Changes) -> ClusterNode:
    node = ClusterNode(etcd, keys, Member(name, f"127.0.0.1:{PORTS[name]}"), lease_ttl=1, margin=0.1,
                       idle_timeout=1, on_change=changes.callback(name))
    nursery.start_soon(node.run)
    return node


async def test_one_leader_and_everyone_agrees(etcd: EtcdClient, cluster_name: str) -> None:
    changes = Changes()
    keys = ClusterKeys(cluster_name)
    with trio.fail_after(10):
        await _agree(etcd, keys, changes)
    assert not [v for _, _, v in changes.log if v.role == "leader" and v.epoch != 1]


async def _agree(etcd: EtcdClient, keys: ClusterKeys, changes: Changes) -> None:
    async with trio.open_nursery() as nursery:
        nodes = [start_node(nursery, etcd, keys, name, changes) for name in "abc"]
        await changes.until(lambda: len(leaders(nodes)) == 1 and all(
            n.view.leader is not None and n.view.leader.node == leaders(nodes)[0].me.node for n in nodes))
        (leader,) = leaders(nodes)
        assert leader.refusal() is None and leader.view.epoch == 1
        for n in nodes:
            if n is not leader:
                assert n.view.role == "follower" and n.refusal() == f"not leader {leader.me.addr}"
        nursery.cancel_scope.cancel()


async def test_partitioned_leader_is_replaced_and_rejoins_as_follower(
        nursery: trio.Nursery, shared_etcd: EtcdCluster, etcd: EtcdClient, cluster_name: str) -> None:
    changes = Changes()
    keys = ClusterKeys(cluster_name)
    proxy = TcpProxy(shared_etcd.members[0].client_port)
    await proxy.start(nursery)
    with trio.fail_after(15):
        await _partition(proxy, etcd, keys, changes)


async def _partition(proxy: TcpProxy, etcd: EtcdClient, keys: ClusterKeys, changes: Changes) -> None:
    async with EtcdClient([proxy.url], timeout=0.5) as a_etcd, trio.open_nursery() as inner:
        a = start_node(inner, a_etcd, keys, "a", changes)
        await changes.until(lambda: a.view.role == "leader")
        nodes = [a, start_node(inner, etcd, keys, "b", changes), start_node(inner, etcd, keys, "c", changes)]
        await changes.until(lambda: all(n.view.role == "follower" for n in nodes[1:]))
        assert a.leadership is not None and await a.leadership.set_in_sync(("a", "b", "c"))
        clock = a.leadership.session.clock
        proxy.freeze()  # a is cut off from etcd
        await changes.until(lambda: len([n for n in nodes[1:] if n.view.role == "leader"]) == 1)
        elected_at = trio.current_time()
        (new,) = [n for n in nodes[1:] if n.view.role == "leader"]
        assert new.view.epoch == 2
        assert clock.stop_at <= elected_at and a.refusal() is not None  # a had stopped first
        proxy.thaw()
        await changes.until(lambda: a.view.role == "follower" and a.view.leader is not None
                            and a.view.leader.node == new.me.node)
        assert a.sessions == 2 and a.refusal() == f"not leader {new.me.addr}"
        assert leaders(nodes) == [new]
        inner.cancel_scope.cancel()


async def test_etcd_down_then_back(etcd1: EtcdCluster, cluster_name: str) -> None:
    changes = Changes()
    keys = ClusterKeys(cluster_name)
    with trio.fail_after(20):
        await _etcd_down(etcd1, keys, changes)


async def _etcd_down(etcd1: EtcdCluster, keys: ClusterKeys, changes: Changes) -> None:
    async with EtcdClient(etcd1.endpoints, timeout=0.5) as etcd, trio.open_nursery() as nursery:
        nodes = [start_node(nursery, etcd, keys, name, changes) for name in "ab"]
        await changes.until(lambda: len(leaders(nodes)) == 1 and all(n.view.leader is not None for n in nodes))
        (leader,) = leaders(nodes)
        etcd1.members[0].kill()
        down_at = trio.current_time()
        await until_true(lambda: leader.refusal() is not None)
        assert trio.current_time() - down_at <= 1.0  # within its lease, without a word from etcd
        await changes.until(lambda: all(not n.view.etcd_ok for n in nodes))
        assert all(n.refusal() is not None for n in nodes)
        etcd1.restart(etcd1.members[0])
        await trio.to_thread.run_sync(etcd1.wait_healthy)
        # etcd keeps leases across a restart (and renews them): the same leader may resume
        # after its next keepalive, or the other node takes over with the next epoch.
        await until_true(lambda: len([n for n in nodes if n.refusal() is None]) == 1)
        (again,) = [n for n in nodes if n.refusal() is None]
        assert (again is leader and again.view.epoch == 1) or again.view.epoch == 2
        assert leaders(nodes) == [again]
        nursery.cancel_scope.cancel()
