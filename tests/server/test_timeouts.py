"""--timeout against a request that trickles in, and a graceful shutdown that a client
which never reads cannot hold (virtual time: nothing here depends on disk speed)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from logd_trio.server.connection import DRAIN_SEND_TIMEOUT

from ..harness import make_config, start_server
from ..wire import Wire, batch_request


async def test_trickled_request_times_out(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", timeout=5.0, idle_timeout=100.0))
    w = await Wire.connect(srv.host, srv.port)
    request = batch_request("t", [b"x" * 50])
    t0 = trio.current_time()

    async def trickle() -> None:  # one byte every second: each wait alone is short
        try:
            for i in range(len(request)):
                await w.send(request[i : i + 1])
                await trio.sleep(1.0)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as n:
        n.start_soon(trickle)
        assert await w.reply() == b"ERR timeout\r\n"
        elapsed = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert 5.0 <= elapsed < 6.5, elapsed
    assert await w.closed()


async def test_pipelined_requests_are_not_cut_off(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    """Each request gets --timeout: a client that sends whole requests slowly is served."""
    srv = await start_server(nursery, make_config(tmp_path / "d", timeout=5.0, idle_timeout=100.0))
    w = await Wire.connect(srv.host, srv.port)
    for _ in range(4):
        await w.send(b"PI")
        await trio.sleep(3.0)
        await w.send(b"NG\r\nPI")  # the next request starts right after this one ends
        assert await w.reply() == b"PONG\r\n"
        await trio.sleep(3.0)
        await w.send(b"NG\r\n")
        assert await w.reply() == b"PONG\r\n"


async def test_a_client_that_never_reads_does_not_hold_the_shutdown(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", timeout=20.0,
                                                  shutdown_timeout=30.0, idle_timeout=0))
    w = await Wire.connect(srv.host, srv.port)
    reqs = [batch_request("big", [b"m" * 60_000]) for _ in range(100)]  # 6 MB to read
    await w.send(b"".join(reqs))
    for _ in reqs:
        assert (await w.reply()).startswith(b"OK ")
    stuck = await Wire.connect(srv.host, srv.port)
    await stuck.send(b"READ big 0 50000\r\n" * 20)  # ~120 MB of replies it never reads
    await trio.sleep(1.0)  # the server is now blocked sending
    polite = await Wire.connect(srv.host, srv.port)
    await polite.send(b"PING\r\n")
    assert await polite.reply() == b"PONG\r\n"

    t0 = trio.current_time()
    await srv.stop()
    elapsed = trio.current_time() - t0
    # bounded by the short final-send limit, not by --timeout (20s) or --shutdown-timeout (30s)
    assert elapsed < DRAIN_SEND_TIMEOUT + 1.0, elapsed
    assert await polite.closed()
