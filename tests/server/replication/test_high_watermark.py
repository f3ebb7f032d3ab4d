"""With --acks all, readers of the leader never see a batch beyond the high watermark; a follower
compares its log with a new leader's epochs (divergence)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import trio

from logd_trio.server.replica.reconcile import divergence

from ...harness import spawn
from ...wire import Wire, batch_request
from .test_processes import write


async def read_frames(host: str, port: int, topic: str) -> list[bytes]:
    w = await Wire.connect(host, port)
    try:
        await w.send(b"READ %s 0 1000\r\n" % topic.encode())
        head, frames = await w.read_reply()
    finally:
        await w.aclose()
    assert head.startswith(b"OK ") or head.startswith(b"ERR not found"), head
    return frames


async def durable_head(host: str, port: int, topic: str) -> int:
    """The leader's durable head of ``topic`` (EPOCHS answers it, uncapped)."""
    w = await Wire.connect(host, port)
    try:
        await w.send(b"EPOCHS %s\r\n" % topic.encode())
        line = await w.reply()
    finally:
        await w.aclose()
    assert line.startswith(b"MOK "), line
    head = json.loads(line.split(b"\r\n", 1)[1])["head"]
    assert isinstance(head, int)
    return head


async def test_a_batch_not_yet_on_enough_nodes_is_not_readable_on_the_leader(nursery: trio.Nursery,
                                                                               tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", "--acks", "all", "--min-insync", "2",
                         "--replica-lag", "5s")
    b = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"{leader.host}:{leader.port}")
    with trio.fail_after(10):  # until b fetches (is in sync)
        while True:
            w = await Wire.connect(leader.host, leader.port)
            await w.send(batch_request("t", [b"first"]))
            reply = await w.reply()
            await w.aclose()
            if reply.startswith(b"OK "):
                break
            await trio.sleep(0.05)
    await write(leader, "t", 4)
    assert len(await read_frames(leader.host, leader.port, "t")) == 5
    b.proc.send_signal(signal.SIGSTOP)
    try:
        w = await Wire.connect(leader.host, leader.port)
        before = await durable_head(leader.host, leader.port, "t")
        await w.send(batch_request("t", [b"not-yet-acknowledged"]))
        with trio.fail_after(10):  # stored and fsynced on the leader (its durable head moved); b cannot have it
            while await durable_head(leader.host, leader.port, "t") == before:  # noqa: ASYNC110
                await trio.sleep(0.01)
        frames = await read_frames(leader.host, leader.port, "t")
        assert len(frames) == 5 and not any(b"not-yet-acknowledged" in f for f in frames)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    with trio.fail_after(10):
        reply = await w.reply()
    assert reply.startswith(b"OK "), reply
    frames = await read_frames(leader.host, leader.port, "t")
    assert len(frames) == 6 and b"not-yet-acknowledged" in frames[-1]
    await w.aclose()


def test_divergence_is_where_the_newest_common_epoch_ends_on_the_leader() -> None:
    # the same history: nothing to cut (the leader's newest epoch is ours: its head)
    assert divergence([(1, 0), (2, 100)], [(1, 0), (2, 100)], 300) == 300
    # we led epoch 2 past where the new leader (epoch 3) stopped copying it
    assert divergence([(1, 0), (2, 100)], [(1, 0), (2, 100), (3, 250)], 400) == 250
    # the leader has no batch of our newest epoch 2: its epoch 1 ends at 150, but ours ends at 100,
    # where our epoch 2 starts: from there our log is not the leader's
    assert divergence([(1, 0), (2, 100)], [(1, 0), (3, 150)], 400) == 100
    assert divergence([(1, 0), (2, 80)], [(1, 0), (3, 100)], 150) == 80
    # our epoch 3 is not on the leader: the leader's epoch 2 would end at 120, ours starts at 100;
    # cut to 100, our newest is 1 and it ends at 80 on the leader (looked at again until stable)
    assert divergence([(1, 0), (3, 100)], [(1, 0), (2, 80), (4, 120)], 200) == 80
    # a follower's epoch the leader never had, from the start
    assert divergence([(3, 0)], [(1, 0), (4, 50)], 90) == 0
    # every epoch of the leader is newer than ours: we match up to its first epoch's start
    assert divergence([(1, 0)], [(4, 0)], 50) == 0
    # nothing written in any epoch here: nothing to compare
    assert divergence([], [(1, 0)], 10) is None
