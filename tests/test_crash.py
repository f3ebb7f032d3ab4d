"""Real server processes: the helper that spawns them, and a clean exit on SIGTERM.
(Repeated SIGKILL under load: tests/test_faults.py::test_repeated_sigkill_offsets_and_data.)"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from .wire import Wire, batch_request

LISTENING = re.compile(rb"listening on ([0-9.]+):(\d+)")


class ServerProcess:
    def __init__(self, proc: trio.Process, host: str, port: int, log: bytearray) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.log = log


async def spawn(nursery: trio.Nursery, workdir: Path, *args: str) -> ServerProcess:
    cmd = [sys.executable, "-m", "logd_trio_cli.main", "serve", "--host", "127.0.0.1:0",
           "--workdir", str(workdir), *args]
    proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    log = bytearray()
    found = trio.Event()
    addr: list[tuple[str, int]] = []

    async def pump() -> None:
        assert proc.stderr is not None
        try:
            async for chunk in proc.stderr:
                log.extend(chunk)
                m = LISTENING.search(log)
                if m and not found.is_set():
                    addr.append((m.group(1).decode(), int(m.group(2))))
                    found.set()
            await trio.sleep_forever()  # keep the process owned until the test ends
        finally:
            if proc.returncode is None:  # the test ended (or failed) with the server still up
                proc.kill()

    nursery.start_soon(pump)
    with trio.fail_after(20):
        await found.wait()
    return ServerProcess(proc, addr[0][0], addr[0][1], log)


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
