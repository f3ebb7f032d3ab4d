"""A cluster leader's acknowledgements belong to one leadership, and a deposed leader's readers
stay capped: ReplicaState and AwaitReplicas in virtual time."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from logd_trio.core.errors import LogdError
from logd_trio.server.cluster.election import ClusterKeys, LeaderInfo, Leadership, Member
from logd_trio.server.cluster.fencing import LeaseClock
from logd_trio.server.cluster.node import ClusterNode
from logd_trio.server.cluster.session import Session
from logd_trio.server.clustering import Clustering
from logd_trio.server.registry import Registry
from logd_trio.server.replica.acks import AwaitReplicas
from logd_trio.server.replica.state import ReplicaState
from logd_trio.server.stats import Counters
from logd_trio.server.topic import Append, Topic

from ...harness import make_config


def clustered(tmp_path: Path) -> ReplicaState:
    s = ReplicaState(make_config(tmp_path, acks="all", min_insync=2, replica_lag=1.0, node_id="a",
                                 etcd="http://127.0.0.1:2379", cluster="c1"))
    s.epoch, s.leading = 5, True
    s.isr_needed, s.isr_size = frozenset({"b"}), 2
    return s


def stored(offset: int, end: int) -> Append:
    item = Append(b"", 1)
    item.offset, item.end = offset, end
    item.done.set()  # durable on the leader
    return item


def reply(e: LogdError) -> bytes:
    return b"ERR %s\r\n" % str(e).encode()


async def test_a_deposed_leader_answers_a_waiting_batch_not_leader_at_once(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    s = clustered(tmp_path)
    s.record("b", "t", 80, 80)
    aw = AwaitReplicas(stored(80, 100), "t", s)
    got: list[tuple[bytes, float]] = []

    async def answer() -> None:
        got.append((await aw.answer(reply), trio.current_time()))

    async with trio.open_nursery() as n:
        n.start_soon(answer)
        await trio.sleep(0.1)
        assert not got  # b has not fetched past 100
        deposed_at = trio.current_time()
        s.leading = False  # another node took epoch 6
        await trio.sleep(0.001)
        assert got, "the waiter was not woken by the deposition"
    line, at = got[0]
    assert line.startswith(b"ERR not leader"), line
    assert at - deposed_at < 0.01


async def test_a_batch_of_a_lost_leadership_is_never_acknowledged_in_the_next(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """X at [80,100) in epoch 5; deposed, reconciled (X cut), leading epoch 7 within the wait: the
    followers pass 100 with other data, and X must not get an OK."""
    s = clustered(tmp_path)
    s.record("b", "t", 80, 80)
    aw = AwaitReplicas(stored(80, 100), "t", s)
    got: list[bytes] = []

    async def answer() -> None:
        got.append(await aw.answer(reply))

    async with trio.open_nursery() as n:
        n.start_soon(answer)
        await trio.sleep(0.1)
        s.leading = False
        s.epoch = 7
        s.leading = True  # no checkpoint between: the waiter has not looked yet
        s.followers.clear()
        s.record("b", "t", 150, 150)
        with trio.fail_after(1.0):
            while not got:  # noqa: ASYNC110
                await trio.sleep(0.01)
    assert got[0].startswith(b"ERR not leader"), got


async def test_acks_leader_answers_not_leader_for_a_batch_of_an_earlier_leadership(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    s = ReplicaState(make_config(tmp_path, acks="leader", node_id="a", etcd="http://127.0.0.1:2379", cluster="c1"))
    s.leading = True
    item = Append(b"", 1)
    aw = AwaitReplicas(item, "t", s)  # queued while leading ...
    s.leading = False
    s.leading = True  # ... stored after the node led again
    item.offset, item.end = 0, 20
    item.done.set()
    assert (await aw.answer(reply)).startswith(b"ERR not leader")
    fresh = AwaitReplicas(stored(20, 40), "t", s)
    assert await fresh.answer(reply) == b"OK 20 1\r\n"


async def test_a_deposed_leaders_readers_stay_at_its_high_watermark_until_it_reconciled(tmp_path: Path) -> None:
    s = clustered(tmp_path)
    s.topics["t"] = topic = await trio.to_thread.run_sync(s.open_topic, tmp_path, "t")
    s.record("b", "t", 0, 0)
    s.leading = True
    topic.visible_head = 300  # durable here; b acknowledged only 120
    s.record("b", "t", 120, 300)
    assert topic.readable_head == 120
    s.leading = False  # deposed: the tail past 120 may be cut by the reconcile
    assert topic.readable_head == 120
    s.reconciled("t")  # no longer held; a follower's readers stop at what its leader told it
    assert topic.readable_head == 120
    s.told("t", 250)
    assert topic.readable_head == 250
    s.told("t", 400)
    assert topic.readable_head == 300  # and at what is stored here


async def test_only_a_registered_member_joins_the_in_sync_set(nursery: trio.Nursery, tmp_path: Path) -> None:
    registry = Registry(make_config(tmp_path, acks="all", min_insync=2, replica_lag=1.0, node_id="a",
                                    etcd="http://127.0.0.1:2379", cluster="c1"), nursery, Counters())
    clustering = Clustering(registry)
    state = registry.replica
    state.leading = True
    topic = await registry.get_or_create("t")
    now = trio.current_time()
    clustering.members = {"a": "127.0.0.1:1", "b": "127.0.0.1:2"}
    clustering.members_at = clustering.lead_start = now - 5
    state.record("b", "t", topic.visible_head, topic.visible_head)  # both hold everything the leader has
    state.record("stranger", "t", topic.visible_head, topic.visible_head)  # a FETCH naming any node id
    assert clustering._desired(("a",), now) == ("a", "b")
    topic.close_input()
    await clustering.etcd.aclose()


async def test_a_follower_joins_once_it_holds_everything_acknowledged_not_the_head(nursery: trio.Nursery,
                                                                                  tmp_path: Path) -> None:
    """Under a steady load a follower is always a step behind the head: it joins once it holds the
    high watermark (what the in-sync members hold) and the head this leader took over with."""
    registry = Registry(make_config(tmp_path, acks="all", min_insync=2, replica_lag=1.0, node_id="a",
                                    etcd="http://127.0.0.1:2379", cluster="c1"), nursery, Counters())
    clustering = Clustering(registry)
    state = registry.replica
    state.leading = True
    topic = await registry.get_or_create("t")
    now = trio.current_time()
    clustering.members = {"a": "127.0.0.1:1", "b": "127.0.0.1:2", "c": "127.0.0.1:3"}
    clustering.members_at = clustering.lead_start = now - 5
    clustering.takeover_heads = {"t": 80}
    state.isr_needed = frozenset({"c"})
    state.record("c", "t", 100, 100)  # caught up with the head of then
    topic.visible_head = 150  # stored here since; c holds 100 (the high watermark)
    state.record("b", "t", 90, 150)  # below the high watermark: lacks acknowledged batches
    assert clustering._desired(("a", "c"), now) == ("a", "c")
    state.record("b", "t", 120, 150)  # everything acknowledged, not the head
    assert clustering._desired(("a", "c"), now) == ("a", "b", "c")
    assert "b" in clustering.joins.waited  # waited for from the moment it was decided
    topic.visible_head = topic.log.head
    topic.close_input()
    await clustering.etcd.aclose()


async def leader_of_t(nursery: trio.Nursery, tmp_path: Path, **conf: object) -> tuple[Clustering, Topic]:
    clustering, topic, _ = await leader_with_registry(nursery, tmp_path, **conf)
    return clustering, topic


async def leader_with_registry(nursery: trio.Nursery, tmp_path: Path,
                               **conf: object) -> tuple[Clustering, Topic, Registry]:
    settings: dict[str, object] = {"acks": "all", "min_insync": 2, "replica_lag": 1.0, "node_id": "a",
                                   "etcd": "http://127.0.0.1:2379", "cluster": "c1", **conf}
    registry = Registry(make_config(tmp_path, **settings), nursery, Counters())
    clustering = Clustering(registry)
    registry.replica.leading = True
    topic = await registry.get_or_create("t")
    now = trio.current_time()
    clustering.members = {"a": "127.0.0.1:1", "b": "127.0.0.1:2", "c": "127.0.0.1:3", "d": "127.0.0.1:4"}
    clustering.members_at = clustering.lead_start = now - 5
    return clustering, topic, registry


async def done(clustering: Clustering, topic: Topic) -> None:
    topic.visible_head = topic.log.head
    topic.close_input()
    await clustering.etcd.aclose()


async def test_the_join_floor_does_not_go_back_when_a_member_with_less_is_waited_for(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """c (in the set) holds 100, so 100 may have been acknowledged; d is then waited for while it holds
    90: the floor for b stays 100 (with d's 90 it went back, and b at 95 joined lacking 95..100)."""
    clustering, topic = await leader_of_t(nursery, tmp_path)
    state = clustering.state
    now = trio.current_time()
    state.isr_needed = frozenset({"c"})
    state.record("c", "t", 100, 100)  # caught up with the head of then
    topic.visible_head = 150
    state.record("b", "t", 90, 150)
    assert clustering._desired(("a", "c"), now) == ("a", "c")
    state.record("d", "t", 90, 150)
    clustering.pending = frozenset({"a", "c", "d"})  # d being written into the set
    state.isr_needed = frozenset({"c", "d"})
    state.record("b", "t", 95, 150)
    assert "b" not in clustering._desired(("a", "c"), now)
    await done(clustering, topic)


async def test_a_follower_that_keeps_up_with_a_moving_head_joins_when_no_other_member_is_waited_for(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """Only the leader in the set: the floor was the head itself, always a step ahead of b."""
    clustering, topic = await leader_of_t(nursery, tmp_path, min_insync=1)
    state = clustering.state
    now = trio.current_time()
    joined_after = None
    for step in range(10):
        topic.visible_head = 100 + 10 * step  # a steady load
        state.record("b", "t", topic.visible_head - 10, topic.visible_head)  # b has what the head was a step ago
        if "b" in clustering._desired(("a",), now + 0.1 * step):
            joined_after = step
            break
    assert joined_after is not None, "b never joined"
    await done(clustering, topic)


async def test_a_joiner_waited_for_does_not_pull_the_readers_high_watermark_back(nursery: trio.Nursery,
                                                                                tmp_path: Path) -> None:
    """Only the leader in the set: readers see the head (150).  b, at 120, holds the snapshot (100) and is
    waited for: the readers' high watermark stays at 150 (at b's 120 a reader at 150 got ERR not found),
    and b joins once it holds 150."""
    clustering, topic = await leader_of_t(nursery, tmp_path, min_insync=1)
    state = clustering.state
    now = trio.current_time()
    topic.visible_head = 100
    state.record("b", "t", 50, 100)
    assert clustering._desired(("a",), now) == ("a",)  # snapshot: 100
    topic.visible_head = 150
    assert topic.readable_head == 150  # shown to readers
    state.record("b", "t", 120, 150)
    assert clustering._desired(("a",), now + 0.1) == ("a",)
    assert "b" in clustering.joins.waited
    state.isr_needed = frozenset({"b"})  # as _isr_loop publishes it
    assert topic.readable_head == 150
    state.record("b", "t", 150, 150)
    assert clustering._desired(("a",), now + 0.2) == ("a", "b")
    await done(clustering, topic)


async def test_a_deleted_topic_leaves_no_join_floor_and_no_high_watermark_behind(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """t was acknowledged and shown to readers up to 150; DELETE, then t made anew: a follower that
    holds the new t joins (the old floor 150 kept everyone out), and readers of the new t are capped
    by the in-sync set again (not let through up to the old 150)."""
    clustering, topic, registry = await leader_with_registry(nursery, tmp_path, min_insync=1)
    state = clustering.state
    state.gate = lambda: None  # a leader that may acknowledge (DELETE refuses otherwise)
    topic.visible_head = 150
    assert topic.readable_head == 150  # shown to readers
    state.acked_end["t"] = 150
    assert clustering.joins.floor("t", 150) == 150
    topic.visible_head = topic.log.head
    await registry.delete("t")
    new = await registry.get_or_create("t")
    state.record("b", "t", new.visible_head, new.visible_head)  # b holds all of the new t
    assert "b" in clustering._desired(("a",), trio.current_time())
    state.isr_needed = frozenset({"b"})
    new.visible_head = 100  # durable here; b holds 40
    state.record("b", "t", 40, 100)
    assert new.readable_head == 40
    await done(clustering, new)


async def test_a_member_whose_key_was_not_seen_stays_while_it_fetches(nursery: trio.Nursery, tmp_path: Path) -> None:
    clustering, topic = await leader_of_t(nursery, tmp_path)
    state = clustering.state
    state.record("b", "t", topic.visible_head, topic.visible_head)
    state.record("c", "t", topic.visible_head, topic.visible_head)
    clustering.members = {"a": "127.0.0.1:1"}  # b (re-registering) and c (dead) not seen
    clustering.members_at = trio.current_time() + 0.001  # read after c's last fetch ...
    await trio.sleep(0.01)
    state.record("b", "t", topic.visible_head, topic.visible_head)  # ... and b fetched since
    assert clustering._desired(("a", "b", "c"), trio.current_time()) == ("a", "b")
    await done(clustering, topic)


async def test_waiters_get_not_leader_the_moment_the_lease_lapses(
        nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    clustering, topic = await leader_of_t(nursery, tmp_path, replica_lag=4.0)  # waiters look every 1 s
    state = clustering.state
    now = trio.current_time()
    keys = ClusterKeys("c1")

    async def renew(lease: int) -> int:
        raise AssertionError("not renewed in this test")

    session = Session(1, LeaseClock(2, now - 1.5, margin=0.2), renew, suspended=lambda: 0.0)
    leadership = Leadership(clustering.etcd, keys, session, LeaderInfo("a", "127.0.0.1:1", 5, 1, 10),
                            in_sync=("a", "b"), isr_revision=10)
    clustering.node = node = ClusterNode(clustering.etcd, keys, Member("a", "127.0.0.1:1"))
    node.leadership = leadership
    state.epoch, state.isr_needed, state.isr_size = 5, frozenset({"b"}), 2
    state.record("b", "t", 0, 0)
    lapse_at = session.clock.stop_at
    assert lapse_at - now > 0.2
    got: list[tuple[bytes, float]] = []

    async def answer() -> None:
        got.append((await AwaitReplicas(stored(0, 100), "t", state).answer(reply), trio.current_time()))

    async with trio.open_nursery() as loops:  # the lapse loop lives (and is cancelled) in this test's own nursery
        loops.start_soon(clustering._lapse_loop)
        async with trio.open_nursery() as inner:
            inner.start_soon(answer)
        loops.cancel_scope.cancel()
    line, at = got[0]
    assert line.startswith(b"ERR not leader: lease not confirmed"), line
    assert at - lapse_at < 0.05, at - lapse_at  # not at the waiter's next look (1 s)
    await done(clustering, topic)
