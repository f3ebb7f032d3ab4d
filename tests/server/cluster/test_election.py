"""Membership, campaigns, epochs and fencing against a real etcd."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import trio

from logd_trio.server.cluster.election import (
    ClusterDataError,
    ClusterKeys,
    ClusterMismatch,
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
from logd_trio.server.cluster.etcd_wire import Compare, EtcdIndeterminate, Op, Put, TxnResult
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
    revisions: list[int] = []
    six_seen = trio.Event()

    def on_change(leader: LeaderInfo | None, revision: int) -> None:
        seen.append(None if leader is None else (leader.node, leader.epoch))
        revisions.append(revision)
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
    assert revisions[:6] == sorted(set(revisions[:6]))  # each seen at a later revision
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


async def _isr_events(etcd: EtcdClient, keys: ClusterKeys, start_revision: int, seconds: float) -> list[InSync]:
    """The in-sync sets written from ``start_revision`` on, as seen for ``seconds``."""
    seen: list[InSync] = []
    with trio.move_on_after(seconds):
        async with etcd.watch(keys.isr, start_revision=start_revision) as w:
            async for event in w:
                seen.append(InSync.from_kv(event.kv))
    return seen


async def test_a_late_in_sync_write_cannot_undo_a_later_one(nursery: trio.Nursery, shared_etcd: EtcdCluster,
                                                            etcd: EtcdClient, cluster_name: str) -> None:
    """A grow whose reply is lost (held in a frozen proxy) reaches etcd after the
    shrink that followed it: it must not apply (the shrink is what the leader relies on)."""
    keys = ClusterKeys(cluster_name)
    proxy = TcpProxy(shared_etcd.members[0].client_port)
    await proxy.start(nursery)
    async with EtcdClient([proxy.url, *shared_etcd.endpoints], timeout=0.5) as two, open_session(etcd, 3) as s:
        lead = await campaign(two, keys, s, A)
        assert await lead.set_in_sync(("a", "b")) and two.endpoint == proxy.url
        proxy.freeze()
        with pytest.raises(EtcdIndeterminate):
            await lead.set_in_sync(("a", "b", "c"))  # c caught up: grow, reply lost
        assert lead.in_sync == ("a", "b") and lead.in_sync_unsure == ("a", "b", "c")
        assert await lead.set_in_sync(("a", "b"))  # c fell behind again: shrink (through the other endpoint)
        shrunk_at = lead.isr_revision
        proxy.thaw()  # the held grow reaches etcd now
        assert await _isr_events(etcd, keys, shrunk_at + 1, 1.5) == []
        kv = await etcd.get(keys.isr)
        assert kv is not None and InSync.from_kv(kv) == InSync(1, ("a", "b")) and kv.mod_revision == shrunk_at
        assert lead.in_sync == ("a", "b") and lead.in_sync_unsure is None


async def test_an_in_sync_write_after_a_late_one_landed_reconciles(
        nursery: trio.Nursery, shared_etcd: EtcdCluster, etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    proxy = TcpProxy(shared_etcd.members[0].client_port)
    await proxy.start(nursery)
    async with EtcdClient([proxy.url, *shared_etcd.endpoints], timeout=0.5) as two, open_session(etcd, 3) as s:
        lead = await campaign(two, keys, s, A)
        first = lead.isr_revision
        proxy.freeze()
        with pytest.raises(EtcdIndeterminate):
            await lead.set_in_sync(("a", "b"))
        proxy.thaw()
        with trio.fail_after(3):  # the late write lands before the next one is sent
            async with etcd.watch(keys.isr, start_revision=first + 1) as w:
                landed = await w.__anext__()
        assert InSync.from_kv(landed.kv) == InSync(1, ("a", "b")) and lead.isr_revision == first
        assert await lead.set_in_sync(("a",))  # compares the landed write's revision after re-reading it
        kv = await etcd.get(keys.isr)
        assert kv is not None and InSync.from_kv(kv).members == ("a",) and kv.mod_revision == lead.isr_revision
        assert lead.in_sync == ("a",) and lead.in_sync_unsure is None


async def test_an_in_sync_write_cut_by_the_callers_timeout_is_unknown_until_read_back(
        nursery: trio.Nursery, shared_etcd: EtcdCluster, etcd: EtcdClient, cluster_name: str) -> None:
    """The caller's own timeout (shorter than the client's) cuts the grow mid-flight; it lands later.
    Until a definite answer the leader must count the grown set as possible."""
    keys = ClusterKeys(cluster_name)
    proxy = TcpProxy(shared_etcd.members[0].client_port)
    await proxy.start(nursery)
    async with EtcdClient([proxy.url, *shared_etcd.endpoints], timeout=2.0) as two, open_session(etcd, 3) as s:
        lead = await campaign(two, keys, s, A)
        first = lead.isr_revision
        proxy.freeze()
        with trio.move_on_after(0.2) as cut:
            await lead.set_in_sync(("a", "b"))
        assert cut.cancelled_caught
        assert lead.in_sync == ("a",) and lead.in_sync_unsure == ("a", "b")  # not "not applied"
        proxy.thaw()  # the cut write reaches etcd now
        with trio.fail_after(3):
            async with etcd.watch(keys.isr, start_revision=first + 1) as w:
                landed = await w.__anext__()
        assert InSync.from_kv(landed.kv).members == ("a", "b")
        assert lead.in_sync_unsure == ("a", "b")  # still unknown to the leader: nothing read it back yet
        assert await lead.set_in_sync(("a",))  # reads back what landed, then writes the set it wants
        kv = await etcd.get(keys.isr)
        assert kv is not None and InSync.from_kv(kv).members == ("a",) and lead.in_sync_unsure is None


async def test_a_lost_register_reply_is_resent(nursery: trio.Nursery, shared_etcd: EtcdCluster,
                                               etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    proxy = TcpProxy(shared_etcd.members[0].client_port)
    await proxy.start(nursery)
    async with EtcdClient([proxy.url, *shared_etcd.endpoints], timeout=0.5) as two, open_session(etcd, 3) as s:
        proxy.freeze()
        await register(two, keys, s, A)  # the first put's reply is lost; the same put again elsewhere
        kv = await etcd.get(keys.member("a"))
        assert kv is not None and kv.lease == s.lease_id and json.loads(kv.value) == {"node": "a", "addr": A.addr}
        proxy.thaw()


class HeldTakeover(EtcdClient):
    """Loses the reply of the first takeover txn (a frozen proxy holds it), and
    lets it land just before the second one is sent: the second then fails."""

    def __init__(self, endpoints: list[str], proxy: TcpProxy, direct: EtcdClient, keys: ClusterKeys) -> None:
        super().__init__(endpoints, timeout=0.5)
        self.proxy, self.direct, self.keys = proxy, direct, keys
        self.takeovers = 0

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        if any(isinstance(op, Put) and op.key == self.keys.leader for op in success):
            self.takeovers += 1
            if self.takeovers == 1:
                self.proxy.freeze()
            elif self.takeovers == 2:
                async with self.direct.watch(self.keys.leader) as w:
                    self.proxy.thaw()
                    with trio.fail_after(3):
                        await w.__anext__()  # the first takeover landed after all
        return await super().txn(compare, success, failure)


async def test_a_takeover_whose_reply_was_lost_is_found_by_the_next_one(
        nursery: trio.Nursery, shared_etcd: EtcdCluster, etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    proxy = TcpProxy(shared_etcd.members[0].client_port)
    await proxy.start(nursery)
    async with HeldTakeover([proxy.url, *shared_etcd.endpoints], proxy, etcd, keys) as held, \
            open_session(etcd, 3) as s:
        won = await campaign_once(held, keys, s, A)
        assert held.takeovers == 2
        assert won is not None and won.epoch == 1 and won.refusal() is None  # it holds the key: it leads
        leader, _ = await current_leader(etcd, keys)
        assert leader is not None and leader.create_revision == won.info.create_revision
        assert won.in_sync == ("a",) and await won.set_in_sync(("a", "b"))


async def test_etcd_older_than_the_node_is_refused(etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    async with open_session(etcd, 2) as s:
        with pytest.raises(ClusterMismatch, match="etcd's epoch 0 is below this node's 4"):
            await campaign_once(etcd, keys, s, A, local_epoch=4)  # etcd wiped: epochs start again
        assert await etcd.get(keys.leader) is None
        await etcd.put(keys.epoch, "3")  # an epoch but no in-sync set: not a new cluster
        with pytest.raises(ClusterDataError, match="isr: missing although the cluster had a leader"):
            await campaign_once(etcd, keys, s, A)
        assert await etcd.get(keys.leader) is None
        await etcd.delete(keys.epoch)
        won = await campaign_once(etcd, keys, s, A)  # nothing anywhere: a new cluster
        assert won is not None and won.epoch == 1


async def test_a_stored_cluster_id_is_never_created(etcd: EtcdClient, cluster_name: str) -> None:
    keys = ClusterKeys(cluster_name)
    with pytest.raises(ClusterMismatch, match="etcd holds no id"):
        await ensure_cluster_id(etcd, keys, "id-1", create=False)
    assert await etcd.get(keys.cluster_id) is None
    assert await ensure_cluster_id(etcd, keys, "id-1") == "id-1"
    assert await ensure_cluster_id(etcd, keys, "id-2", create=False) == "id-1"
