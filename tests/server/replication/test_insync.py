"""The in-sync set and the --acks all wait, in virtual time."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from logd_trio.core.errors import RequestError
from logd_trio.server.replica.state import ReplicaState

from ...harness import make_config


def state(tmp_path: Path, n: int = 2) -> ReplicaState:
    return ReplicaState(make_config(tmp_path, acks="all", min_insync=n, replica_lag=1.0, node_id="a"))


async def test_below_min_insync_writes_are_refused_at_once(tmp_path: Path) -> None:
    s = state(tmp_path)
    with pytest.raises(RequestError, match="not enough replicas"):
        s.refuse_writes()
    s.record("b", "t", 0, 0)  # caught up: in sync
    s.refuse_writes()
    assert s.in_sync(trio.current_time()) == {"b"}


async def test_ack_waits_for_the_followers_next_fetch(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    s = state(tmp_path)
    s.record("b", "t", 100, 100)
    done = trio.Event()

    async def waiter() -> None:
        await s.wait_acks("t", 150)  # the batch 100..150 needs b's fetch offset at its end
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(0.1)
        assert not done.is_set()
        s.record("b", "t", 150, 150)
        await trio.sleep(0.01)
        assert done.is_set()


async def test_a_stalled_follower_leaves_the_set_and_the_wait_fails(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    s = state(tmp_path)
    s.record("b", "t", 100, 100)
    t0 = trio.current_time()
    with pytest.raises(RequestError, match="not enough replicas"):
        await s.wait_acks("t", 150)  # a batch 100..150 b never fetched past
    assert 1.0 <= trio.current_time() - t0 <= 1.5  # --replica-lag, re-checked every lag/4
    with pytest.raises(RequestError):
        s.refuse_writes()
    s.record("b", "t", 100, 100)  # caught up again: back in the set
    s.refuse_writes()


async def test_a_lagging_follower_is_caught_up_when_it_has_what_the_last_reply_offered(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    s = state(tmp_path)
    s.record("b", "t", 0, 1000)  # first fetch, behind: not in sync
    assert s.in_sync(trio.current_time()) == set()
    s.followers[("b", "t")].replied_head = 1000  # the reply offered up to 1000
    await trio.sleep(0.5)
    s.record("b", "t", 1000, 5000)  # the leader moved on meanwhile, but b has all it was offered
    assert s.in_sync(trio.current_time()) == {"b"}
    s.record("b", "u", 0, 10)  # behind on another topic for longer than the lag: out
    await trio.sleep(1.1)
    s.record("b", "t", 1000, 1000)
    assert s.in_sync(trio.current_time()) == set()


async def test_min_insync_one_never_waits(tmp_path: Path) -> None:
    s = state(tmp_path, n=1)
    s.refuse_writes()
    await s.wait_acks("t", 0)


async def test_a_new_topic_does_not_throw_an_in_sync_follower_out(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    s = state(tmp_path)
    s.record("b", "t", 100, 100)
    s.record("b", "new", 0, 5000)  # its first fetch of a topic with a backlog: still in sync, for now
    assert s.in_sync(trio.current_time()) == {"b"}
    await trio.sleep(1.1)
    s.record("b", "t", 100, 100)
    s.followers[("b", "new")].replied_head = 5000
    s.record("b", "new", 10, 5000)
    assert s.in_sync(trio.current_time()) == set()  # it did not catch up within --replica-lag


async def test_a_topic_no_follower_fetches_fails_the_wait_after_the_lag(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    s = state(tmp_path)
    s.record("b", "t", 0, 0)
    t0 = trio.current_time()

    async def fetching_t() -> None:  # b stays caught up on t all along
        while True:
            await trio.sleep(0.2)
            s.record("b", "t", 0, 0)

    async with trio.open_nursery() as n:
        n.start_soon(fetching_t)
        with trio.fail_after(5), pytest.raises(RequestError, match="not enough replicas"):
            await s.wait_acks("u", 10)  # b never fetches u
        n.cancel_scope.cancel()
    assert 1.0 <= trio.current_time() - t0 <= 1.3  # --replica-lag


async def test_a_follower_long_polling_an_idle_topic_stays_in_sync(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    s = state(tmp_path)
    s.record("b", "idle", 0, 0)  # at the head of a topic nobody writes to
    s.record("b", "t", 100, 100)
    with s.polling("b", "idle"):  # its long poll there outlasts --replica-lag
        for _ in range(3):
            await trio.sleep(0.9)
            s.record("b", "t", 100, 100)  # and it keeps fetching the busy topic
            assert s.in_sync(trio.current_time()) == {"b"}
    await trio.sleep(0.9)  # the poll ended (timed out) 0.9 s ago: still within the lag
    s.record("b", "t", 100, 100)
    assert s.in_sync(trio.current_time()) == {"b"}
    await trio.sleep(0.2)  # then nothing more on the idle topic: out
    s.record("b", "t", 100, 100)
    assert s.in_sync(trio.current_time()) == set()
