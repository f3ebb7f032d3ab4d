"""Real server processes: the helper that spawns them, and a clean exit on SIGTERM.
(Repeated SIGKILL under load: tests/test_faults.py::test_repeated_sigkill_offsets_and_data.)"""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from ..harness import spawn
from ..wire import Wire, batch_request


async def test_sigterm_exits_zero_and_fsyncs(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await spawn(nursery, tmp_path / "d", "--fsync", "never")
    w = await Wire.connect(srv.host, srv.port)
    reqs = [batch_request("t", [b"%d" % i]) for i in range(100)]
    await w.send(b"".join(reqs))
    for _ in reqs:
        assert (await w.reply()).startswith(b"OK ")
    srv.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        assert await srv.proc.wait() == 0
    assert b"shut down cleanly" in srv.log
    data = (tmp_path / "d" / "t" / "0.log").read_bytes()  # one partition: everything acknowledged
    assert data == b"".join(reqs)
