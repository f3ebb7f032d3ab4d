"""A just-deposed leader reconciling with the new one (real files, a real socket to a scripted
leader): its pending appends are not acknowledged past the cut; a cluster's fetch names its epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing

from logd_trio.core.errors import BadReply, RequestError
from logd_trio.core.fetch import Fetch
from logd_trio.core.framing import build_body, build_frame
from logd_trio.server.registry import Registry
from logd_trio.server.replica.fetcher import Target, _fetch_loop
from logd_trio.server.replica.reconcile import _Retry, reconcile
from logd_trio.server.replica.state import ReplicaState
from logd_trio.server.stats import Counters
from logd_trio.server.storage.syscalls import install

from ...harness import make_config, read_line, scripted_peer
from ..gates import GatedSync


def frame(i: int) -> bytes:
    return build_frame("t", build_body([b"batch-%d" % i]), 1)


async def test_a_deposed_leaders_append_in_its_fsync_is_not_acknowledged_after_the_cut(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    config = make_config(tmp_path, acks="all", min_insync=2, replica_lag=1.0, node_id="a",
                         etcd="http://127.0.0.1:2379", cluster="c1")
    registry = Registry(config, nursery, Counters())
    state = registry.replica
    state.epoch, state.leading = 5, True
    topic = await registry.get_or_create("t")
    first = await topic.append(frame(0), 1)
    await first.done.wait()
    cut_at = first.end
    with install(GatedSync(once=True)) as held:
        held.armed = True
        second = await topic.append(frame(1), 1)  # stored; its fsync is held
        await trio.to_thread.run_sync(held.entered.wait, 10)
        state.leading = False  # deposed: epoch 6 started at cut_at on the new leader
        replied = trio.Event()

        async def leader(stream: trio.SocketStream) -> None:
            buf = bytearray()
            while (line := await read_line(stream, buf)) is not None:  # asked again after each cut
                assert line == b"EPOCHS t"
                body = json.dumps({"epochs": [[5, 0], [6, cut_at]], "first": 0, "head": cut_at + 500,
                                   "epoch": 6}).encode()
                await stream.send_all(b"MOK %d\r\n%s\r\n" % (len(body), body))
                replied.set()

        host, _, port = (await scripted_peer(nursery, leader)).rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        done = trio.Event()

        async def run() -> None:
            await reconcile(stream, registry, topic, 5.0)
            done.set()

        nursery.start_soon(run)
        await replied.wait()
        await trio.testing.wait_all_tasks_blocked(0.01)
        held.release.set()  # the held fsync completes now: after (or while) the cut runs
        with trio.fail_after(10):
            await done.wait()
            await second.done.wait()
    await stream.aclose()
    assert second.error is not None, "a batch of the cut tail was acknowledged"
    assert topic.visible_head == topic.log.head == cut_at
    topic.close_input()


async def test_a_cluster_leader_fences_a_fetch_without_an_epoch(tmp_path: Path) -> None:
    state = ReplicaState(make_config(tmp_path, acks="all", min_insync=2, node_id="a",
                                     etcd="http://127.0.0.1:2379", cluster="c1"))
    state.epoch, state.leading = 5, True
    with pytest.raises(RequestError, match="fenced: epoch 0"):
        state.check_fetch(Fetch("b", 0, "t", 0, 1 << 20, 0))
    state.check_fetch(Fetch("b", 5, "t", 0, 1 << 20, 0))


async def test_a_fenced_cluster_follower_reconnects_and_never_fetches_with_epoch_0(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    config = make_config(tmp_path, node_id="b", etcd="http://127.0.0.1:2379", cluster="c1")
    registry = Registry(config, nursery, Counters())
    topic = await registry.get_or_create("t")
    fetches: list[bytes] = []

    async def leader(stream: trio.SocketStream) -> None:
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            if line.startswith(b"EPOCHS"):
                body = json.dumps({"epochs": [], "first": 0, "head": 0, "epoch": 7}).encode()
                await stream.send_all(b"MOK %d\r\n%s\r\n" % (len(body), body))
            else:
                fetches.append(line)
                await stream.send_all(b"ERR fenced: epoch 6, the leader's is 7\r\n")

    host, _, port = (await scripted_peer(nursery, leader)).rpartition(":")
    target = Target(host, int(port), "scripted", clustered=True, epoch=6)
    with trio.fail_after(5), pytest.raises(_Retry, match="fenced"):
        await _fetch_loop(registry, topic, target)
    assert [f.split()[2] for f in fetches] == [b"6"], fetches
    with trio.fail_after(5), pytest.raises(_Retry, match="no leader epoch"):
        await _fetch_loop(registry, topic, Target(host, int(port), "scripted", clustered=True, epoch=0))
    topic.close_input()


async def test_a_plain_follower_fenced_at_epoch_0_backs_off_instead_of_spinning(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """A --replicate-from follower (epoch 0 on its first fetch) of a cluster node, which fences
    epoch 0: the fetch loop ends with a retry (the caller backs off), not a tight FETCH/ERR loop."""
    registry = Registry(make_config(tmp_path, node_id="b", replicate_from="127.0.0.1:1"), nursery, Counters())
    topic = await registry.get_or_create("t")
    fetches: list[bytes] = []

    async def leader(stream: trio.SocketStream) -> None:
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            fetches.append(line)
            await stream.send_all(b"ERR fenced: epoch 0, the leader's is 7\r\n")

    host, _, port = (await scripted_peer(nursery, leader)).rpartition(":")
    with trio.fail_after(5), pytest.raises(_Retry, match="fenced"):
        await _fetch_loop(registry, topic, Target(host, int(port), "scripted"))
    assert len(fetches) == 1, fetches
    topic.close_input()


@pytest.mark.parametrize("body", [b"{not json", b'{"epochs": [[1]], "head": 0}', b'{"epochs": [["x", 0]], "head": 0}',
                                  b'{"epochs": [null], "head": 0}', b'{"epochs": [[Infinity, 0]], "head": 0}',
                                  b"[" * 100_000 + b"]" * 100_000])
async def test_a_malformed_epochs_reply_is_a_bad_reply(nursery: trio.Nursery, tmp_path: Path, body: bytes) -> None:
    registry = Registry(make_config(tmp_path, node_id="b", etcd="http://127.0.0.1:2379", cluster="c1"),
                        nursery, Counters())
    topic = await registry.get_or_create("t")

    async def leader(stream: trio.SocketStream) -> None:
        buf = bytearray()
        while await read_line(stream, buf) is not None:
            await stream.send_all(b"MOK %d\r\n%s\r\n" % (len(body), body))

    host, _, port = (await scripted_peer(nursery, leader)).rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    with trio.fail_after(5), pytest.raises(BadReply, match="EPOCHS"):
        await reconcile(stream, registry, topic, 5.0)
    await stream.aclose()
    topic.close_input()
