"""--timeout against a request that trickles in, and a graceful shutdown that a client
which never reads cannot hold (virtual time: nothing here depends on disk speed)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import trio
import trio.testing

from logd_trio.server.connection import DRAIN_SEND_TIMEOUT, MIN_REQUEST_RATE

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


async def _send_at(w: Wire, data: bytes, rate: int) -> None:
    """Send ``data`` at ``rate`` bytes per (virtual) second, in 64 KiB pieces."""
    piece = 64 * 1024
    for i in range(0, len(data), piece):
        await w.send(data[i : i + piece])
        await trio.sleep(piece / rate)


async def test_a_large_request_gets_time_in_proportion_to_its_size(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    """--timeout 5s and a 1 MiB BATCH: sent at twice MIN_REQUEST_RATE it takes 8 s, and is served
    (the old server cut off every request taking longer than --timeout); sent at a quarter of it,
    it still times out."""
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", timeout=5.0, idle_timeout=100.0,
                                                  batch_size=2 << 20))
    big = batch_request("t", [b"x" * 1000] * 1040)
    assert len(big) > 1 << 20
    w = await Wire.connect(srv.host, srv.port)
    t0 = trio.current_time()
    await _send_at(w, big, 2 * MIN_REQUEST_RATE)
    assert await w.reply() == b"OK 0 1\r\n"
    assert trio.current_time() - t0 > 5.0 + 2  # longer than --timeout alone allows

    slow = await Wire.connect(srv.host, srv.port)
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(_send_quietly, slow, big, MIN_REQUEST_RATE // 4)
        assert await slow.reply() == b"ERR timeout\r\n"
        n.cancel_scope.cancel()
    elapsed = trio.current_time() - t0
    # cut off once 5 s + received / MIN_REQUEST_RATE have passed: at 5 / (1 - 1/4) s
    assert 6.0 < elapsed < 8.0, elapsed


async def _send_quietly(w: Wire, data: bytes, rate: int) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await _send_at(w, data, rate)
