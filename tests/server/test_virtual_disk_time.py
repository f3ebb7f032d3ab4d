"""The test clock layer the virtual-time tests stand on: storage work in worker threads
takes no virtual time, even with a clock that autojumps the moment the loop is idle."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from logd_trio.server.storage import syscalls

from ..harness import DiskTakesNoVirtualTime, SlowDisk, make_config, start_server
from ..wire import Wire, batch_request


async def test_fsyncs_take_no_virtual_time_at_threshold_zero(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with syscalls.install(SlowDisk(0.02)), syscalls.install(DiskTakesNoVirtualTime(autojump_clock)) as layer:
        srv = await start_server(nursery, make_config(tmp_path / "d", fsync="always"))
        w = await Wire.connect(srv.host, srv.port)
        t0 = trio.current_time()
        with trio.move_on_after(1.0) as scope:  # a deadline the clock would jump to
            for i in range(12):  # new topics (directory fsyncs) and appends (fdatasyncs)
                await w.send(batch_request(f"t{i % 4}", [b"x" * 10]))
                assert (await w.reply()).startswith(b"OK "), i
        assert not scope.cancelled_caught
        assert trio.current_time() == t0
        assert layer.busy == 0 and autojump_clock.autojump_threshold == 0


async def test_the_threshold_comes_back_after_nested_hand_offs(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with syscalls.install(DiskTakesNoVirtualTime(autojump_clock)) as layer:
        with layer.blocking():
            assert autojump_clock.autojump_threshold == float("inf")
            with layer.blocking():
                pass
            assert autojump_clock.autojump_threshold == float("inf")  # the outer one still works
        assert autojump_clock.autojump_threshold == 0
        autojump_clock.autojump_threshold = 0.5  # a test's own choice, made while idle
        with layer.blocking():
            pass
        assert autojump_clock.autojump_threshold == 0.5
