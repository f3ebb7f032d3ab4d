"""ClusterNode: nodes in one process against a real etcd; partitions through a proxy."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from logd_trio.server.cluster.election import ClusterKeys, ClusterMismatch, LeaderInfo, Member, campaign, follow_leader
from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.node import ClusterNode, ClusterView
from logd_trio.server.cluster.session import open_session

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
               changes: Changes, lease_ttl: int = 1) -> ClusterNode:
    node = ClusterNode(etcd, keys, Member(name, f"127.0.0.1:{PORTS[name]}"), lease_ttl=lease_ttl,
                       margin=0.1 * lease_ttl, idle_timeout=1, on_change=changes.callback(name))
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
        # a may see the new leader (and follow it) before its keepalive hears that its lease is gone
        await until_true(lambda: a.sessions == 2)
        assert a.refusal() == f"not leader {new.me.addr}"
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
        assert leader.leadership is not None
        clock = leader.leadership.session.clock
        etcd1.members[0].kill()
        down_at = trio.current_time()
        await until_true(lambda: leader.refusal() is not None)
        # within its lease, without a word from etcd: the deadline it stopped at was
        # counted from a keepalive sent before etcd died (the scheduler's delays aside)
        assert clock.last_ok_sent <= down_at and clock.stop_at <= down_at + clock.ttl - clock.margin
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


async def test_one_stalled_etcd_member_leaves_the_leader_alone(etcd3: EtcdCluster, cluster_name: str) -> None:
    """Two members healthy, one stopped (SIGSTOP): the member every node talks to
    first.  Keepalives, watches and campaigns move on to the others; nothing changes."""
    changes = Changes()
    keys = ClusterKeys(cluster_name)
    raft_leader = etcd3.leader()
    stalled = next(m for m in etcd3.members if m is not raft_leader)
    endpoints = [stalled.url] + [m.url for m in etcd3.members if m is not stalled]
    with trio.fail_after(15):
        async with EtcdClient(endpoints) as ea, EtcdClient(endpoints) as eb, trio.open_nursery() as nursery:
            nodes = [start_node(nursery, ea, keys, "a", changes, lease_ttl=2),
                     start_node(nursery, eb, keys, "b", changes, lease_ttl=2)]
            await changes.until(lambda: len(leaders(nodes)) == 1 and all(n.view.epoch == 1 for n in nodes))
            (leader,) = leaders(nodes)
            stalled.pause()
            try:
                refused: list[str] = []
                for _ in range(200):  # 4 s: two lease TTLs
                    reason = leader.refusal()
                    if reason is not None:
                        refused.append(reason)
                    await trio.sleep(0.02)
                assert refused == []
                assert leaders(nodes) == [leader]
                assert [(v.role, v.epoch) for _, name, v in changes.log if v.role == "leader"] == [("leader", 1)]
                assert all(n.view.epoch == 1 and n.view.etcd_ok for n in nodes) and leader.sessions == 1
                async with EtcdClient(endpoints, timeout=1.5) as fresh, fresh.watch(keys.leader):
                    assert fresh.endpoint != stalled.url  # the stalled member had only its share of the budget
            finally:
                stalled.resume()
            nursery.cancel_scope.cancel()


async def test_a_node_refuses_an_etcd_that_is_not_the_one_it_joined(etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    changes = Changes()
    fresh = ClusterNode(etcd, keys, Member("a", "127.0.0.1:1774"), lease_ttl=1, on_change=changes.callback("a"))
    joined = await fresh.join()  # never joined: it creates the id (the server stores it)
    assert fresh.cluster_id == joined and len(joined) == 32
    stranger = ClusterNode(etcd, keys, Member("b", "127.0.0.1:1775"), lease_ttl=1, cluster_id="other",
                           on_change=changes.callback("b"))
    with trio.fail_after(3), pytest.raises(ClusterMismatch, match="this node joined 'other'"):
        await stranger.run()
    assert stranger.sessions == 0 and not stranger.view.etcd_ok and "other" in (stranger.view.etcd_error or "")
    wiped = ClusterNode(etcd, ClusterKeys(cluster_name + "-wiped"), Member("c", "127.0.0.1:1776"), lease_ttl=1,
                        cluster_id=joined)
    with trio.fail_after(3), pytest.raises(ClusterMismatch, match="etcd holds no id"):
        await wiped.run()
    behind = ClusterNode(etcd, keys, Member("a", "127.0.0.1:1774"), lease_ttl=1, cluster_id=joined,
                         local_epoch=7, on_change=changes.callback("a"))
    with trio.fail_after(3), pytest.raises(ClusterMismatch, match="etcd's epoch 0 is below this node's 7"):
        await behind.run()  # same id, but etcd lost the epochs this node's logs hold
    assert behind.refusal() is not None and await etcd.get(keys.leader) is None


async def test_a_deleted_leader_key_deposes_the_leader_whatever_its_guard_does(
        etcd: EtcdClient, cluster_name: str) -> None:
    """The key deleted (by an operator, say) while the leader's own watch is not
    running: what the node's follower watch sees is enough."""
    keys = ClusterKeys(cluster_name)
    changes = Changes()
    node = ClusterNode(etcd, keys, Member("a", "127.0.0.1:1774"), lease_ttl=2, on_change=changes.callback("a"))
    async with open_session(etcd, 2) as session, trio.open_nursery() as nursery:
        node.leadership = await campaign(etcd, keys, session, node.me)  # as the node's campaign does
        seen: list[LeaderInfo | None] = []

        def on_leader(leader: LeaderInfo | None, revision: int) -> None:
            seen.append(leader)
            node._on_leader(leader, revision)

        nursery.start_soon(follow_leader, etcd, keys, on_leader)
        with trio.fail_after(3):
            await changes.until(lambda: node.view.role == "leader" and bool(seen))
        await etcd.delete(keys.leader)
        with trio.fail_after(3):
            await node.leadership.over.wait()
        assert node.refusal() == "not leader: the leader key is gone or another node's"
        assert node.view.role == "no leader" and seen[-1] is None
        assert all(v.epoch >= 1 for _, _, v in changes.log if v.role == "leader")  # never "leader of epoch 0"
        nursery.cancel_scope.cancel()
