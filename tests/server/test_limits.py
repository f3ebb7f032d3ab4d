"""What the server keeps for itself: one server per data directory, file descriptors
for its own work when clients take the rest, and per-address connection caps."""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from logd_trio.server.app import serve
from logd_trio.server.limits import Admission, fd_budget
from logd_trio.server.listener import exposed_addresses
from logd_trio.server.lock import DataDirLocked

from ..harness import REPO, make_config, spawn, start_server
from ..wire import Wire, batch_request

TOO_MANY = b"ERR too many connections\r\n"


def _nofile(hard: int, soft: int | None = None) -> Callable[[], None]:
    def set_limit() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft or hard, hard))

    return set_limit


async def _first_line_or_none(stream: trio.SocketStream, wait: float) -> bytes | None:
    """The first reply line within ``wait`` seconds; None if the server says nothing."""
    buf = bytearray()
    with trio.move_on_after(wait):
        try:
            while b"\r\n" not in buf:
                data = await stream.receive_some(4096)
                if not data:
                    break
                buf += data
        except trio.BrokenResourceError:
            pass
        return bytes(buf)
    return None


# ---------------------------------------------------------------- the data directory lock


async def test_second_server_on_one_workdir_exits_naming_dir_and_pid(nursery: trio.Nursery, tmp_path: Path) -> None:
    workdir = tmp_path / "d"
    first = await spawn(nursery, workdir, "--fsync", "never")
    cmd = [sys.executable, "-m", "logd_trio_cli.main", "serve", "--host", "127.0.0.1:0", "--workdir", str(workdir)]
    with trio.fail_after(20):  # the old server started a second one that never exited
        second = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False,
                                        stdin=subprocess.DEVNULL)
    err = second.stderr.decode()
    assert second.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    message = lines[-1]
    assert "Traceback" not in err
    assert str(workdir) in message and f"pid {first.proc.pid}" in message, err
    assert b"listening on" not in second.stderr
    # the first server is untouched and keeps serving
    w = await Wire.connect(first.host, first.port)
    await w.send(batch_request("t", [b"still mine"]))
    assert await w.reply() == b"OK 0 1\r\n"
    # the kernel drops the lock with its holder, however it ends: SIGKILL leaves nothing to clean up
    first.proc.kill()
    await first.proc.wait()
    again = await spawn(nursery, workdir, "--fsync", "never")
    w = await Wire.connect(again.host, again.port)
    await w.send(b"TOPICS\r\n")
    assert b"t: 0 " in await w.reply()  # logd.lock is not taken for a topic
    again.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        assert await again.proc.wait() == 0


async def test_lock_in_one_process_and_released_by_a_stopped_server(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d"))
    with trio.fail_after(10), pytest.raises(DataDirLocked, match=rf"{tmp_path / 'd'}.*pid {os.getpid()}"):
        await serve(make_config(tmp_path / "d"))  # (the old server ran a second one on the directory)
    await srv.stop()
    srv = await start_server(nursery, make_config(tmp_path / "d"))  # released on return
    await srv.stop()


# ---------------------------------------------------------------- file descriptors


async def test_fd_exhaustion_keeps_acknowledging_and_refuses_new_clients(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    limit = 160
    srv = await spawn(nursery, tmp_path / "d", "--topics", "2", "--partitions", "2", "--fsync", "always",
                      "--max-connections-per-ip", "0", preexec_fn=_nofile(limit, soft=100))
    good = await Wire.connect(srv.host, srv.port)
    await good.send(batch_request("t", [b"before"]))
    assert await good.reply() == b"OK 0 1\r\n"
    assert b"open-file limit %d: at most" % limit in srv.log  # the soft limit (100) was raised to the hard one
    assert b"--max-connections 1024 lowered" in srv.log

    idle: list[trio.SocketStream] = []
    try:
        for _ in range(limit + 40):  # more idle clients than the server has descriptors
            idle.append(await trio.open_tcp_stream(srv.host, srv.port))
        answers: list[bytes | None] = [None] * len(idle)

        async def listen(i: int) -> None:
            answers[i] = await _first_line_or_none(idle[i], 3.0)

        async with trio.open_nursery() as n:
            for i in range(len(idle)):
                n.start_soon(listen, i)
        refused = sum(a == TOO_MANY for a in answers)
        silent = sum(a is None for a in answers)  # admitted: idle, waiting for a request
        assert refused + silent == len(idle), set(answers)
        assert refused >= 40 and silent >= 1

        # an existing connection is still acknowledged (its fsync needs descriptors too)
        with trio.fail_after(10):
            await good.send(batch_request("t", [b"during"]))
            assert (await good.reply()).startswith(b"OK ")
        # and a new client gets an answer, not a hang
        extra = await trio.open_tcp_stream(srv.host, srv.port)
        assert await _first_line_or_none(extra, 5.0) == TOO_MANY
        await extra.aclose()
    finally:
        for s in idle:
            await s.aclose()
    assert b"Traceback" not in srv.log
    assert srv.log.count(b"\n") < 20, srv.log.decode()  # a handful of lines, no line per refusal


EXHAUST = """
import logging, os, signal, sys
import trio
from logd_trio.server.app import serve
from logd_trio.server.config import ServerConfig

async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = ServerConfig(host="127.0.0.1:0", workdir=sys.argv[1], topics=1, partitions=1, fsync="never")
    async with trio.open_nursery() as n:
        host, port = await n.start(serve, cfg)
        held = []  # every free descriptor, as a leak elsewhere in the process would take them
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            print(port, flush=True)
            async for _ in signals:
                for fd in held:
                    os.close(fd)
                held.clear()
                print("released", flush=True)

trio.run(main)
"""


async def test_accept_without_descriptors_answers_and_logs_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", EXHAUST, str(tmp_path / "d")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, preexec_fn=_nofile(256), cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    log = bytearray()

    async def pump_log() -> None:
        assert proc.stderr is not None
        async for chunk in proc.stderr:
            log.extend(chunk)

    try:
        nursery.start_soon(pump_log)
        out = bytearray()
        with trio.fail_after(20):
            while b"\n" not in out:
                out += await proc.stdout.receive_some(100)
        port = int(out.split(b"\n")[0])
        for _ in range(5):  # every new client is answered at once while no descriptor is free
            s = await trio.open_tcp_stream("127.0.0.1", port)
            assert await _first_line_or_none(s, 5.0) == TOO_MANY
            await s.aclose()
        proc.send_signal(signal.SIGUSR1)
        with trio.fail_after(10):
            while b"released" not in out:
                out += await proc.stdout.receive_some(100)
        w = await Wire.connect("127.0.0.1", port)  # descriptors back: clients are served again
        await w.send(b"PING\r\n")
        assert await w.reply() == b"PONG\r\n"
        assert b"Traceback" not in log
        assert log.count(b"cannot accept") == 1, log.decode()  # one line, not one per attempt
    finally:
        proc.kill()
        await proc.wait()


def test_fd_budget_reserves_descriptors_and_lowers_the_cap() -> None:
    b = fd_budget(1024, max_connections=1024, topics=8, partitions=8)
    assert 0 < b.max_connections < 1024 - b.reserve
    assert b.reserve > 8 * 8 * 2  # at least a .log and an .index per partition
    assert fd_budget(1 << 20, max_connections=1024, topics=8, partitions=8).max_connections == 1024
    assert fd_budget(None, max_connections=5, topics=8, partitions=8).max_connections == 5
    # a worst case that cannot fit (a --partitions far above what retention keeps): a quarter of the limit
    big = fd_budget(20000, max_connections=5000, topics=8, partitions=100_000)
    assert big.shortfall > 0 and big.max_connections == 20000 // 4 // 2
    assert fd_budget(64, max_connections=1024, topics=8, partitions=8).max_connections == 8


# ---------------------------------------------------------------- per-address cap


async def test_per_address_cap(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", max_connections_per_ip=2, max_connections=10))
    a = await Wire.connect(srv.host, srv.port)
    b = await Wire.connect(srv.host, srv.port)
    for w in (a, b):
        await w.send(b"PING\r\n")
        assert await w.reply() == b"PONG\r\n"
    c = await Wire.connect(srv.host, srv.port)
    assert await c.line() == TOO_MANY
    assert await c.closed()
    await b.aclose()
    with trio.fail_after(5):  # once b is gone, this address may connect again
        while True:
            d = await trio.open_tcp_stream(srv.host, srv.port)
            await d.send_all(b"PING\r\n")
            if await _first_line_or_none(d, 5.0) == b"PONG\r\n":
                break
            await d.aclose()
            await trio.sleep(0.05)
    await a.send(b"STATS\r\n")
    stats = await a.reply()
    refused = re.search(rb"\r\nconns.refused: (\d+)\r\n", stats)
    assert refused is not None and int(refused.group(1)) >= 1  # c (and any retry while b was closing)
    assert b"\r\nconns.active: 2\r\n" in stats
    await d.aclose()


def test_admission_counts_once_per_connection() -> None:
    adm: Admission[str] = Admission(max_total=3, max_per_address=2)
    assert adm.refusal("1.1.1.1") is None
    adm.add("a", "1.1.1.1")
    adm.add("b", "1.1.1.1")
    assert adm.refusal("1.1.1.1") is not None and adm.refusal("2.2.2.2") is None
    adm.add("c", "2.2.2.2")
    assert "connections open (the limit)" in (adm.refusal("3.3.3.3") or "")
    adm.remove("a")
    adm.remove("a")  # twice is harmless
    assert len(adm) == 2 and adm.refusal("1.1.1.1") is None
    off: Admission[str] = Admission(max_total=10, max_per_address=0)
    for i in range(10):
        off.add(str(i), "1.1.1.1")
    assert "(the limit)" in (off.refusal("1.1.1.1") or "")  # only the total cap applies


# ---------------------------------------------------------------- exposure warning


def test_non_loopback_addresses_are_flagged() -> None:
    assert exposed_addresses(["127.0.0.1", "::1", "127.0.0.5"]) == []
    assert exposed_addresses(["0.0.0.0", "::", "192.168.1.4", "127.0.0.1"]) == ["0.0.0.0", "::", "192.168.1.4"]


async def test_loopback_start_logs_version_and_no_exposure_warning(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from logd_trio import __version__

    caplog.set_level(logging.INFO, logger="logd_trio")
    srv = await start_server(nursery, make_config(tmp_path / "d"))
    first = next(r for r in caplog.records if r.name.startswith("logd_trio.server"))
    assert __version__ in first.getMessage()
    assert not [r for r in caplog.records if "other hosts can reach" in r.getMessage()]
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"STATS\r\n")
    assert f"\r\nversion: {__version__}\r\n".encode() in b"\r\n" + await w.reply()
    await srv.stop()
