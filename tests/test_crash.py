"""Real processes: SIGKILL during writes never loses an acknowledged batch;
SIGTERM shuts down gracefully with exit status 0."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
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
        async for chunk in proc.stderr:
            log.extend(chunk)
            m = LISTENING.search(log)
            if m and not found.is_set():
                addr.append((m.group(1).decode(), int(m.group(2))))
                found.set()

    nursery.start_soon(pump)
    with trio.fail_after(20):
        await found.wait()
    return ServerProcess(proc, addr[0][0], addr[0][1], log)


async def _stream_batches(srv: ServerProcess, topic: str, tag: int, acked: dict[int, bytes]) -> None:
    """Write pipelined batches until the server dies; record what was acknowledged."""
    try:
        w = await Wire.connect(srv.host, srv.port)
    except OSError:
        return
    sent: list[bytes] = []
    i = 0

    async def sender() -> None:
        nonlocal i
        while True:
            reqs = [batch_request(topic, [b"w%d-%d" % (tag, i + k), b"y" * ((i + k) % 300)]) for k in range(8)]
            i += 8
            sent.extend(reqs)
            await w.send(b"".join(reqs))
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as n:
            n.start_soon(sender)
            k = 0
            while True:
                line = await w.reply()
                assert line.startswith(b"OK "), line
                acked[int(line.split()[1])] = sent[k]
                k += 1
    except* (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@pytest.mark.slow
async def test_sigkill_never_loses_acknowledged_batches(nursery: trio.Nursery, tmp_path: Path) -> None:
    workdir = tmp_path / "data"
    acked: dict[int, bytes] = {}
    rounds = 3
    for round_ in range(rounds):
        srv = await spawn(nursery, workdir, "--partition-size", "200000", "--partitions", "100000")
        with trio.move_on_after(0.6):
            async with trio.open_nursery() as n:
                for tag in range(3):
                    n.start_soon(_stream_batches, srv, "crash", round_ * 10 + tag, acked)
        srv.proc.send_signal(signal.SIGKILL)
        await srv.proc.wait()
    assert len(acked) > 50, "the writers should have had many batches acknowledged"
    srv = await spawn(nursery, workdir, "--partition-size", "200000", "--partitions", "100000")
    w = await Wire.connect(srv.host, srv.port)
    lost = []
    for off, frame in sorted(acked.items()):
        await w.send(b"READ crash %d 1\r\n" % off)
        head, frames = await w.read_reply()
        if frames != [frame]:
            lost.append((off, head))
    assert lost == [], f"{len(lost)} of {len(acked)} acknowledged batches lost"
    # writing continues at the right offset: right after the last stored batch
    await w.send(b"TOPICS\r\n")
    topics = await w.reply()
    m = re.search(rb"crash: (\d+) (\d+)\r\n", topics)
    assert m is not None
    head_offset = int(m.group(2))
    assert head_offset >= max(o + len(f) for o, f in acked.items())
    await w.send(batch_request("crash", [b"after"]))
    assert await w.reply() == b"OK %d 1\r\n" % head_offset
    srv.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        assert await srv.proc.wait() == 0


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
    data = b"".join(sorted((tmp_path / "d" / "t").glob("*.log"), key=lambda p: int(p.stem))[0].read_bytes()
                    for _ in [0])
    assert data == b"".join(reqs)
