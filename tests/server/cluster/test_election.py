"""Membership, campaigns, epochs and fencing against a real etcd."""

from __future__ import annotations

import json

import pytest
import trio

from logd_trio.server.cluster.election import (
    ClusterKeys,
    InSync,
    LeaderInfo,
    Leadership,
    Member,
    SessionLost,
    campaign,
    campaign_once,
    current_leader,
    ensure_cluster_id,
    follow_leader,
    list_members,
    register,
)
from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.session import Session, open_session

from ...etcd_harness import EtcdCluster, TcpProxy

A = Member("a", "127.0.0.1:1774")
B = Member("b", "127.0.0.1:1775")
C = Member("c", "127.0.0.1:1776")


async def test_members_register_on_their_lease(etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    async with open_session(etcd, 2) as sa:
        await register(etcd, keys, sa, A)
        async with open_session(etcd, 2) as sb:
            await register(etcd, keys, sb, B)
            assert await list_members(etcd, keys) == {"a": A, "b": B}
            kv = await etcd.get(keys.member("a"))
            assert kv is not None and kv.lease == sa.lease_id and json.loads(kv.value)["addr"] == A.addr
        assert await list_members(etcd, keys) == {"a": A}  # b's session closed: its key went with its lease


async def test_an_error_in_a_session_block_comes_out_as_itself(etcd: EtcdClient) -> None:
    with pytest.raises(KeyError):  # not wrapped in the keepalive nursery's exception group
        async with open_session(etcd, 2) as session:
            raise KeyError(session.lease_id)
    assert session.lost.is_set() and await etcd.lease_ttl(session.lease_id) is None  # revoked on the way out


async def test_cluster_id_is_created_once(etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    assert await ensure_cluster_id(etcd, keys, "id-1") == "id-1"
    assert await ensure_cluster_id(etcd, keys, "id-2") == "id-1"


def test_bad_names() -> None:
    for bad in ("", "a/b", "-x", "x" * 65, "é"):
        with pytest.raises(ValueError, match=r"bad (cluster name|node id)"):
            ClusterKeys(bad)
        with pytest.raises(ValueError, match="bad node id"):
            Member(bad, "h:1")


async def test_two_campaigners_exactly_one_leader(etcd: EtcdClient, cluster_name: str) -> None:
    for round_ in range(5):
        keys = ClusterKeys(f"{cluster_name}-{round_}")
        results: dict[str, Leadership | None] = {}
        async with open_session(etcd, 2) as sa, open_session(etcd, 2) as sb:

            async def run(me: Member, session: Session, keys: ClusterKeys, results: dict[str, Leadership | None]
                          ) -> None:
                results[me.node] = await campaign_once(etcd, keys, session, me)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, A, sa, keys, results)
                nursery.start_soon(run, B, sb, keys, results)
            winners = [r for r in results.values() if r is not None]
            assert len(winners) == 1 and winners[0].epoch == 1
            leader, _ = await current_leader(etcd, keys)
            assert leader is not None and leader.node == winners[0].info.node and leader.epoch == 1
            # the winner asking again gets the same leadership back, not a new epoch
            session = sa if leader.node == "a" else sb
            again = await campaign_once(etcd, keys, session, A if leader.node == "a" else B)
            assert again is not None and again.epoch == 1 and again.info.create_revision == leader.create_revision
            epoch = await etcd.get(keys.epoch)
            assert epoch is not None and epoch.value == b"1"


async def test_epoch_strictly_increases_across_leader_changes(etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    seen: list[tuple[str, int] | None] = []
    six_seen = trio.Event()

    def on_change(leader: LeaderInfo | None) -> None:
        seen.append(None if leader is None else (leader.node, leader.epoch))
        if len(seen) == 6:
            six_seen.set()

    async with trio.open_nursery() as watchers:
        watchers.start_soon(follow_leader, etcd, keys, on_change)
        async with open_session(etcd, 2) as sa:
            first = await campaign(etcd, keys, sa, A)
            assert first.epoch == 1
            assert await first.set_in_sync(("a", "b"))  # b caught up: it may take over
            async with open_session(etcd, 2) as sb, trio.open_nursery() as nursery:
                got: list[Leadership] = []
                b_won = trio.Event()

                async def b_campaigns() -> None:
                    got.append(await campaign(etcd, keys, sb, B, recheck=10))
                    b_won.set()

                nursery.start_soon(b_campaigns)
                await trio.sleep(0.05)
                assert not got  # a leads
                await first.resign()
                assert first.refusal() == "not leader: resigned"
                with trio.fail_after(3):
                    await b_won.wait()
                second = got[0]
                assert second.epoch == 2 and second.refusal() is None
            # b's session closed (lease revoked): its leader key is gone, a takes over again
            with trio.fail_after(3):
                third = await campaign(etcd, keys, sa, A, recheck=10)
            assert third.epoch == 3
        with trio.fail_after(3):
            await six_seen.wait()
        watchers.cancel_scope.cancel()
    assert seen[:6] == [None, ("a", 1), None, ("b", 2), None, ("a", 3)]
    epoch = await etcd.get(keys.epoch)
    assert epoch is not None and epoch.value == b"3"


async def test_a_waiting_campaign_ends_when_its_session_is_lost(etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    async with open_session(etcd, 2) as sa, open_session(etcd, 2) as sb:
        assert await campaign_once(etcd, keys, sa, A) is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(etcd.lease_revoke, sb.lease_id)  # b's lease is gone (as after a long pause)
            t0 = trio.current_time()
            with trio.fail_after(3), pytest.raises(SessionLost):
                await campaign(etcd, keys, sb, B, recheck=10)
            assert trio.current_time() - t0 < 2
            assert sb.clock.lost and not sb.valid()


async def test_only_an_in_sync_node_takes_over_and_isr_writes_are_fenced(etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    async with open_session(etcd, 2) as sa, open_session(etcd, 2) as sb, open_session(etcd, 2) as sc:
        a = await campaign_once(etcd, keys, sa, A)
        assert a is not None
        assert await a.set_in_sync(("a", "b"))
        await a.resign()
        assert await campaign_once(etcd, keys, sc, C) is None  # c lags: not in the in-sync set
        b = await campaign_once(etcd, keys, sb, B)
        assert b is not None and b.epoch == 2
        isr = await etcd.get(keys.isr)
        assert isr is not None and InSync.from_kv(isr) == InSync(2, ("a", "b"))
        # the deposed leader's write of the in-sync set is refused, and leaves it untouched
        assert not await a.set_in_sync(("a",))
        isr_after = await etcd.get(keys.isr)
        assert isr_after is not None and isr_after.mod_revision == isr.mod_revision
        with pytest.raises(ValueError, match="always in its in-sync set"):
            await b.set_in_sync(("a",))


async def test_partitioned_leader_stops_acknowledging_before_another_is_elected(
        nursery: trio.Nursery, shared_etcd: EtcdCluster, etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    proxy = TcpProxy(shared_etcd.members[0].client_port)
    await proxy.start(nursery)
    async with EtcdClient([proxy.url], timeout=0.5) as a_etcd, open_session(a_etcd, 1, margin=0.1) as sa:
        a = await campaign(a_etcd, keys, sa, A)
        assert await a.set_in_sync(("a", "b"))
        async with trio.open_nursery() as inner:
            a_deposed = trio.Event()

            async def a_guards() -> None:
                await a.guard()
                a_deposed.set()

            inner.start_soon(a_guards)
            async with open_session(etcd, 2) as sb:
                elected: list[tuple[float, Leadership]] = []
                b_won = trio.Event()

                async def b_campaigns() -> None:
                    won = await campaign(etcd, keys, sb, B, recheck=10)
                    elected.append((trio.current_time(), won))
                    b_won.set()

                inner.start_soon(b_campaigns)
                await trio.sleep(0.05)
                assert not elected and a.refusal() is None
                proxy.freeze()  # a is cut off from etcd: its keepalives go nowhere
                frozen_at = trio.current_time()
                with trio.fail_after(5):
                    await b_won.wait()
                won_at, b = elected[0]
                assert b.epoch == a.epoch + 1
                # a had stopped acknowledging (its own deadline, no word from etcd needed) before b won
                assert sa.clock.stop_at <= won_at, (sa.clock.stop_at - frozen_at, won_at - frozen_at)
                assert a.refusal() is not None
                proxy.thaw()  # back in touch: etcd says a's lease is gone, and a knows it is deposed
                with trio.fail_after(3):
                    await sa.lost.wait()
                    await a_deposed.wait()
                assert a.refusal() is not None and b.refusal() is None
                inner.cancel_scope.cancel()
