"""A follower that must not copy from its leader: its log is ahead, or the leader's epoch is older."""

from __future__ import annotations

from pathlib import Path

import trio

from ...harness import spawn
from .test_history import assert_halted
from .test_processes import heads, stop, write


async def test_a_follower_ahead_of_the_leader_halts_and_keeps_its_log(nursery: trio.Nursery,
                                                                      tmp_path: Path) -> None:
    alone = await spawn(nursery, tmp_path / "b", "--node-id", "b")
    await write(alone, "t", 5)  # b's log of t is longer than the leader's will be
    await stop(alone)
    (tmp_path / "b" / "history-id").unlink()  # as a directory of an older version: no id to compare
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")
    await write(leader, "t", 1)
    f = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"{leader.host}:{leader.port}")
    await assert_halted(f, b"the leader lacks batches this node holds")
    before = (await heads(f))["t"]
    assert before[1] > (await heads(leader))["t"][1]  # nothing cut, nothing copied
    assert f.proc.returncode is None  # it keeps serving reads
    await stop(f, leader)


async def test_a_leader_with_an_older_epoch_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "leader-epoch").write_text("5\n")  # b already followed a leader at epoch 5
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")  # epoch 1
    await write(leader, "t", 3)
    f = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"{leader.host}:{leader.port}")
    for _ in range(400):  # at most 20 s
        if b"older than epoch 5" in f.log:
            break
        await trio.sleep(0.05)
    assert b"older than epoch 5" in f.log, bytes(f.log[-2000:]).decode(errors="replace")
    assert (await heads(f)).get("t", (0, 0))[1] == 0  # nothing copied from the stale leader
    await stop(f, leader)
