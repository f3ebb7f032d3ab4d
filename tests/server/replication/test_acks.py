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



async def test_a_follower_idle_in_a_long_poll_at_the_head_stays_in_sync(nursery: trio.Nursery,
                                                                       tmp_path: Path) -> None:
    """A poll that ends with nothing new counts as caught up at its end: a follower polling an idle
    topic for longer than --replica-lag never drops out of the in-sync set between two polls."""
    (tmp_path / "t").mkdir()
    srv = await start_server(nursery, make_config(tmp_path, acks="all", min_insync=2, replica_lag=0.5,
                                                  node_id="a"))
    follower = await Wire.connect(srv.host, srv.port)
    writer = await Wire.connect(srv.host, srv.port)
    with trio.fail_after(10):
        await follower.send(encode_fetch("b", 0, "t", 0, 1 << 20, 0))
        assert (await follower.reply()).startswith(b"FETCHED ")
        await follower.send(encode_fetch("b", 0, "t", 0, 1 << 20, 700))  # longer than --replica-lag
        assert (await follower.reply()).split()[4:7] == [b"0", b"0", b"0"]  # head, offset, nbytes: nothing
        await writer.send(batch_request("t", [b"x"]))  # b is in sync: stored, waits for b
        await follower.send(encode_fetch("b", 0, "t", 0, 1 << 20, 1000))
        header = (await follower.reply()).split()
        head, nbytes = int(header[4]), int(header[6])
        await follower.exactly(nbytes)
        await follower.send(encode_fetch("b", 0, "t", head, 1 << 20, 0))  # b's acknowledgement
        assert await writer.reply() == b"OK 0 1\r\n"
    await follower.aclose()
    await writer.aclose()
    await srv.stop()
