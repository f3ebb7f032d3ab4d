"""What counts as a follower's acknowledgement under --acks all, on a real leader (port 0)."""

from __future__ import annotations

from pathlib import Path

import trio

from logd_trio.core.fetch import encode_fetch

from ...harness import make_config, start_server
from ...wire import Wire, batch_request


async def test_a_fetch_beyond_the_head_is_no_acknowledgement(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()  # an existing, empty topic
    srv = await start_server(nursery, make_config(tmp_path, acks="all", min_insync=2, replica_lag=5.0,
                                                  node_id="a"))
    w = await Wire.connect(srv.host, srv.port)
    with trio.fail_after(10):
        await w.send(encode_fetch("b", 0, "t", 1000, 1 << 20, 0))
        assert await w.reply() == b"ERR offset 1000 beyond the leader's head 0\r\n"
        await w.send(batch_request("t", [b"x"]))
        assert await w.reply() == b"ERR not enough replicas\r\n"  # b never received batch 0
    await srv.stop()

