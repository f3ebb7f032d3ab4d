"""A client given only a follower's address writes to the leader (the follower names it)."""

from __future__ import annotations

from pathlib import Path

import trio

from logd_trio.client.failover import FailoverWriter

from ...harness import spawn
from ...wire import Wire, batch_request
from .test_processes import converge, frames_of, stop


async def test_a_writer_pointed_at_a_follower_writes_to_the_leader(nursery: trio.Nursery, tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")
    b = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"{leader.host}:{leader.port}")
    w = await Wire.connect(b.host, b.port)
    await w.send(batch_request("t", [b"direct"]))
    assert await w.reply() == b"ERR not leader %s:%d\r\n" % (leader.host.encode(), leader.port)
    await w.aclose()
    acks: list[tuple[int, int]] = []
    with trio.fail_after(30):
        async with FailoverWriter([f"{b.host}:{b.port}"], "t", batch_size=200,
                                  on_ack=lambda off, n: acks.append((off, n))) as fw:
            await fw.write_many(b"m%03d" % i for i in range(100))
    assert sum(n for _, n in acks) == 100
    await converge(leader, b)
    await stop(b, leader)
    assert frames_of(tmp_path / "a", "t") == frames_of(tmp_path / "b", "t") and len(frames_of(tmp_path / "a", "t")) > 1
