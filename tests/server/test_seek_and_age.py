"""SEEK and --retention-time against a real server in virtual time (real files): the batches'
clock is Trio's clock mapped to wall time (server/wallclock.py), so hours pass without sleeping."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from logd_trio.server import wallclock

from ..harness import make_config, start_server
from ..wire import Wire, batch_request
from .index_files import times

T0 = 1_000_000_000_000  # 2001-09-09 (Unix ms): earlier than any file's mtime, so recovery keeps the times


@pytest.fixture
def batch_clock() -> Iterator[None]:
    """Batch times follow the test's (virtual) Trio clock: ``T0`` at virtual time 0."""
    with wallclock.installed(lambda: T0 + int(trio.current_time() * 1000)):
        yield


async def test_seek_finds_the_first_batch_at_or_after_a_time(
        nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock, batch_clock: None) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d"))
    w = await Wire.connect(srv.host, srv.port)
    start = trio.current_time()
    offs = []
    for i in range(3):
        await trio.sleep_until(start + 10 * i)
        await w.send(batch_request("s", [b"m%d" % i]))
        offs.append(int((await w.reply()).split()[1]))
    await w.send(b"TOPICS\r\n")
    head = int((await w.reply()).split(b"s: ")[1].split()[1])
    await srv.stop()  # the index is written (and each batch's time in it, as the server took it)
    stamps = times((tmp_path / "d" / "s" / "0.index").read_bytes())
    assert len(stamps) == 3 and stamps[1] - stamps[0] >= 9000 and stamps[2] - stamps[1] >= 9000, stamps
    srv = await start_server(nursery, make_config(tmp_path / "d"))  # and they hold across a restart
    w = await Wire.connect(srv.host, srv.port)

    async def seek(arg: bytes) -> bytes:
        await w.send(b"SEEK " + arg + b"\r\n")
        return await w.reply()

    t0, t1, t2 = stamps
    for when, want in [(0, offs[0]), (t0, offs[0]), (t0 + 1, offs[1]), (t1, offs[1]),
                       (t1 + 1, offs[2]), (t2, offs[2]), (t2 + 1, head), (2**63 - 1, head)]:
        assert await seek(b"s %d" % when) == b"OK %d\r\n" % want, when
    assert await seek(b"nope %d" % T0) == b"ERR not found\r\n"
    assert await seek(b"s 12abc") == b"ERR invalid request\r\n"
    assert await seek(b"s -5") == b"ERR invalid request\r\n"
    assert await seek(b"s %d" % 2**63) == b"ERR invalid request\r\n"
    assert await seek(b"s") == b"ERR invalid request\r\n"
    assert await seek(b"s 1 2") == b"ERR invalid request\r\n"
    assert await seek(b"bad/topic 1") == b"ERR invalid topic\r\n"
    await w.send(b"SEEK\r\n")
    assert await w.reply() == b"ERR request missing topic\r\n"
    await w.send(b"PING\r\n")  # the connection stayed usable after each refusal
    assert await w.reply() == b"PONG\r\n"


async def test_retention_time_drops_old_partitions_but_never_the_head(
        nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock, batch_clock: None,
        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "d"
    cfg = make_config(root, partition_size=300, retention_time=3600.0, idle_timeout=0)
    srv = await start_server(nursery, cfg)
    w = await Wire.connect(srv.host, srv.port)
    start = trio.current_time()
    for i in range(40):  # one batch a minute: ~6 per partition
        await trio.sleep_until(start + 60 * i)
        await w.send(batch_request("r", [b"batch %02d" % i]))
        assert (await w.reply()).startswith(b"OK ")
    last = trio.current_time()
    logs = sorted(int(p.name[:-4]) for p in (root / "r").glob("*.log"))
    assert len(logs) > 5
    assert logs[0] == 0  # nothing is an hour old yet

    async def first() -> int:
        await w.send(b"TOPICS\r\n")
        return int((await w.reply()).split(b"r: ")[1].split()[0])

    per_partition = logs[1] // len(batch_request("r", [b"batch 00"]))  # every frame has the same size
    newest = start + 60 * (per_partition - 1)  # when partition 0's last batch came
    with caplog.at_level(logging.INFO, logger="logd_trio.server.topic"):
        await trio.sleep_until(newest + 3600 - 1)  # (exact boundaries: test_batch_times.py)
        assert await first() == 0
        await trio.sleep_until(newest + 3600 + 1)
        assert await first() == logs[1]
        await trio.sleep_until(last + 3600 + 1)  # all sealed partitions are old now
        await trio.sleep(1)
    now_logs = sorted(int(p.name[:-4]) for p in (root / "r").glob("*.log"))
    assert now_logs == logs[-1:]  # the head partition stays, however old
    assert await first() == logs[-1]
    assert {p.name for p in (root / "r").glob("*.*")} == {f"{logs[-1]}.log", f"{logs[-1]}.index"}
    assert any("retention removes 0.log" in r.getMessage() for r in caplog.records)
    await w.send(b"READ r %d 100\r\n" % logs[-1])  # what is left is served
    head, frames = await w.read_reply()
    assert head.startswith(b"OK ") and frames
    await w.send(b"SEEK r %d\r\n" % T0)  # never a removed offset
    assert await w.reply() == b"OK %d\r\n" % logs[-1]
    await w.send(b"READ r 0 1\r\n")
    assert await w.reply() == b"ERR not found\r\n"
