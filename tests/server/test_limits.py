"""What the server keeps for itself: one server per data directory, file descriptors
for its own work when clients take the rest, and per-address connection caps."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from logd_trio.server import limits
from logd_trio.server.app import serve
from logd_trio.server.limits import Admission, fd_budget, is_loopback, raise_fd_limit
from logd_trio.server.listener import exposed_addresses
from logd_trio.server.lock import LOCK_NAME, DataDirLocked

from ..harness import REPO, make_config, spawn, start_server, with_ulimit
from ..wire import Wire, batch_request

TOO_MANY = b"ERR too many connections\r\n"


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


async def test_removing_the_lock_file_does_not_let_a_second_server_in(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d"))
    (tmp_path / "d" / LOCK_NAME).unlink()  # the old lock was on this file: a second server then started
    with trio.fail_after(10), pytest.raises(DataDirLocked, match=rf"{tmp_path / 'd'} is in use"):
        await serve(make_config(tmp_path / "d"))
    assert not (tmp_path / "d" / LOCK_NAME).exists()  # the refused server creates nothing
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("t", [b"still served"]))
    assert await w.reply() == b"OK 0 1\r\n"
    await srv.stop()
    srv = await start_server(nursery, make_config(tmp_path / "d"))  # the directory lock went with it
    assert (tmp_path / "d" / LOCK_NAME).read_text() == f"{os.getpid()}\n"  # the pid, for information
    await srv.stop()


# ---------------------------------------------------------------- file descriptors


async def test_fd_exhaustion_keeps_acknowledging_and_refuses_new_clients(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    limit = 160
    srv = await spawn(nursery, tmp_path / "d", "--topics", "2", "--partitions", "2", "--fsync", "always",
                      "--max-connections-per-ip", "0", ulimit=f"-S -n 100 && ulimit -H -n {limit}")
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
import functools, logging, os, signal, sys
import trio
from logd_trio.server.app import serve
from logd_trio.server.config import ServerConfig

async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = ServerConfig(host="127.0.0.1:0", workdir=sys.argv[1], topics=1, partitions=1, fsync=sys.argv[2],
                       http_host=sys.argv[3])
    http = [("", 0)]
    async with trio.open_nursery() as n:
        host, port = await n.start(functools.partial(serve, cfg, on_http_bound=http.append))
        held = []  # every free descriptor, as a leak elsewhere in the process would take them
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            print(port, http[-1][1], flush=True)
            async for _ in signals:  # each signal: take every free descriptor, or give them back
                if held:
                    for fd in held:
                        os.close(fd)
                    held.clear()
                    print("released", flush=True)
                    continue
                while True:
                    try:
                        held.append(os.open(os.devnull, os.O_RDONLY))
                    except OSError:
                        break
                print("exhausted", flush=True)

trio.run(main)
"""


class _Script:
    """A server process running ``script`` (under ``ulimit -n``), its stdout lines and its log."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.out = bytearray()
        self.log = bytearray()
        self.grew = trio.Event()

    @classmethod
    async def start(cls, nursery: trio.Nursery, script: str, *args: str, nofile: int = 256) -> _Script:
        proc = await trio.lowlevel.open_process(
            with_ulimit(f"-n {nofile}", [sys.executable, "-c", script, *args]), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO)
        self = cls(proc)

        async def pump_log() -> None:
            assert proc.stderr is not None
            async for chunk in proc.stderr:
                self.log.extend(chunk)
                self.grew.set()
                self.grew = trio.Event()

        nursery.start_soon(pump_log)
        return self

    async def line(self) -> bytes:
        assert self.proc.stdout is not None
        with trio.fail_after(20):
            while b"\n" not in self.out:
                self.out += await self.proc.stdout.receive_some(100)
        line, _, rest = bytes(self.out).partition(b"\n")
        self.out[:] = rest
        return line

    async def signal(self, expect: bytes) -> None:
        self.proc.send_signal(signal.SIGUSR1)
        assert await self.line() == expect

    async def wait_log(self, *needles: bytes) -> None:
        with trio.fail_after(10):
            while not any(n in self.log for n in needles):
                await self.grew.wait()

    async def stop(self) -> None:
        self.proc.kill()
        await self.proc.wait()


async def test_accept_without_descriptors_answers_and_logs_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _Script.start(nursery, EXHAUST, str(tmp_path / "d"), "never", "")
    try:
        port = int((await srv.line()).split()[0])
        await srv.signal(b"exhausted")
        for _ in range(5):  # every new client is answered at once while no descriptor is free
            s = await trio.open_tcp_stream("127.0.0.1", port)
            assert await _first_line_or_none(s, 5.0) == TOO_MANY
            await s.aclose()
        await srv.signal(b"released")
        w = await Wire.connect("127.0.0.1", port)  # descriptors back: clients are served again
        await w.send(b"PING\r\n")
        assert await w.reply() == b"PONG\r\n"
        assert b"Traceback" not in srv.log
        assert srv.log.count(b"cannot accept") == 1, srv.log.decode()  # one line, not one per attempt
    finally:
        await srv.stop()


async def test_without_free_descriptors_fsync_still_acknowledges_and_monitoring_backs_off(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The process really runs out of descriptors (the connection caps do not stop it: something
    else took them): an fsync=always BATCH on an open connection is still acknowledged, new clients
    are refused, and the monitoring port backs off without a traceback per attempt."""
    srv = await _Script.start(nursery, EXHAUST, str(tmp_path / "d"), "always", "127.0.0.1:0")
    try:
        port, http_port = map(int, (await srv.line()).split())
        w = await Wire.connect("127.0.0.1", port)
        await w.send(batch_request("default", [b"before"]))
        assert await w.reply() == b"OK 0 1\r\n"
        await srv.signal(b"exhausted")
        with trio.fail_after(10):  # the old server retried the sync (and logged it) 10 times a second, for good
            await w.send(batch_request("default", [b"during"]))
            assert (await w.reply()).startswith(b"OK ")
            await w.send(batch_request("default", [b"and again"]))
            assert (await w.reply()).startswith(b"OK ")
        s = await trio.open_tcp_stream("127.0.0.1", port)
        assert await _first_line_or_none(s, 5.0) == TOO_MANY
        await s.aclose()
        scrape = await trio.open_tcp_stream("127.0.0.1", http_port)  # waits in the backlog
        await scrape.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await srv.wait_log(b"monitoring: cannot accept", b"Traceback")
        await srv.signal(b"released")
        assert (await _first_line_or_none(scrape, 10.0) or b"").startswith(b"HTTP/1.1 200"), srv.log.decode()
        await scrape.aclose()
        assert b"Traceback" not in srv.log, srv.log.decode()
        assert b"cannot start an fsync" not in srv.log, srv.log.decode()
        assert srv.log.count(b"monitoring: cannot accept") == 1, srv.log.decode()
    finally:
        await srv.stop()


SPARE = """
import logging, os, resource, signal, sys
import trio
from logd_trio.server.app import serve
from logd_trio.server.config import ServerConfig

async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = ServerConfig(host="127.0.0.1:0", workdir=sys.argv[1], topics=1, partitions=1, fsync="never")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with trio.open_nursery() as n:
        host, port = await n.start(serve, cfg)
        held = []
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            print(port, flush=True)
            step = 0
            async for _ in signals:
                step += 1
                if step == 1:  # no new descriptor at all: freeing the spare (above the limit) cannot help
                    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))
                elif step == 2:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                else:  # every descriptor taken, as by a leak elsewhere in the process
                    while True:
                        try:
                            held.append(os.open(os.devnull, os.O_RDONLY))
                        except OSError:
                            break
                print("step", step, flush=True)

trio.run(main)
"""


async def test_the_spare_descriptor_is_held_again_after_it_was_lost(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _Script.start(nursery, SPARE, str(tmp_path / "d"))
    try:
        port = int(await srv.line())
        await srv.signal(b"step 1")
        first = await Wire.connect("127.0.0.1", port)
        await first.send(b"PING\r\n")
        await srv.wait_log(b"cannot accept")  # the spare was given up in vain and could not be reopened
        await srv.signal(b"step 2")
        with trio.fail_after(10):
            assert await first.reply() == b"PONG\r\n"  # accepted once descriptors are back
        await srv.signal(b"step 3")
        # the old server reopened its spare only while out of descriptors (never possible): clients hung
        late = await trio.open_tcp_stream("127.0.0.1", port)
        assert await _first_line_or_none(late, 5.0) == TOO_MANY, srv.log.decode()
        await late.aclose()
    finally:
        await srv.stop()


async def test_slow_readers_up_to_the_cap_leave_descriptors_for_fsync(nursery: trio.Nursery, tmp_path: Path) -> None:
    """READs that span every partition, held open by clients that do not read, until the server
    refuses more clients: a BATCH (fsync=always) on an open connection is still acknowledged."""
    srv = await spawn(nursery, tmp_path / "d", "--topics", "1", "--partitions", "8", "--partition-size", "2MiB",
                      "--fsync", "always", "--max-connections-per-ip", "0", ulimit="-n 200")
    w = await Wire.connect(srv.host, srv.port)
    req = batch_request("default", [b"m" * 1000] * 60)  # ~60 KB: 260 of them fill 8 partitions of 2 MiB
    with trio.fail_after(60):
        await w.send(req * 260)
        for _ in range(260):
            assert (await w.reply()).startswith(b"OK ")
    readers: list[trio.SocketStream] = []
    refused = False
    try:
        while not refused and len(readers) < 100:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect((srv.host, srv.port))
            reader = trio.SocketStream(sock)
            readers.append(reader)
            await reader.send_all(b"READ default 0 50000\r\n")
            with trio.fail_after(10):
                first = await reader.receive_some(64)  # the reply has started: its plan is open
            refused = first.startswith(b"ERR too many connections")
            assert refused or first.startswith(b"OK 0 "), first
        assert refused, "no client was refused"
        with trio.fail_after(10):  # the old server: out of descriptors at ~29 readers, no OK
            await w.send(req)
            assert (await w.reply()).startswith(b"OK ")
    finally:
        for r in readers:
            await r.aclose()
    assert b"cannot start an fsync" not in srv.log, srv.log.decode()
    assert b"Traceback" not in srv.log, srv.log.decode()


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


async def test_loopback_clients_are_not_capped_per_address(nursery: trio.Nursery, tmp_path: Path) -> None:
    """With the default loopback bind every client is 127.0.0.1: the per-address cap would be the
    server's cap (the old server refused the 3rd client here).  The total cap still applies."""
    srv = await start_server(nursery, make_config(tmp_path / "d", max_connections_per_ip=2, max_connections=4))
    clients = [await Wire.connect(srv.host, srv.port) for _ in range(4)]
    for w in clients:
        await w.send(b"PING\r\n")
        assert await w.reply() == b"PONG\r\n"
    extra = await Wire.connect(srv.host, srv.port)
    assert await extra.line() == TOO_MANY  # the total cap
    await clients[0].send(b"STATS\r\n")
    assert b"\r\nconns.active: 4\r\n" in await clients[0].reply()
    await srv.stop()


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
    roomy: Admission[str] = Admission(max_total=100, max_per_address=1)
    for i, address in enumerate(("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "192.0.2.7")):
        roomy.add(str(i), address)
    for local in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):  # loopback: only the total cap
        assert roomy.refusal(local) is None
    assert "from this address" in (roomy.refusal("192.0.2.7") or "")
    assert is_loopback("::1%lo") and not is_loopback("192.0.2.7") and not is_loopback("host.example")
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


def test_raising_the_limit_falls_back_where_unlimited_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS: with an unlimited hard limit, setrlimit to it fails (the kernel caps open files lower):
    the server asks for a bounded limit instead of keeping the low soft one."""
    import resource

    state = {"soft": 256}

    def getrlimit(which: int) -> tuple[int, int]:
        return state["soft"], resource.RLIM_INFINITY

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        if value[0] == resource.RLIM_INFINITY or value[0] > limits.FALLBACK_LIMIT:
            raise ValueError("current limit exceeds maximum limit")
        state["soft"] = value[0]

    monkeypatch.setattr(resource, "getrlimit", getrlimit)
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert raise_fd_limit() == limits.FALLBACK_LIMIT  # the old code stayed at 256


def test_budget_counts_the_monitoring_connections() -> None:
    plain = fd_budget(1024, max_connections=1024, topics=8, partitions=8)
    http = fd_budget(1024, max_connections=1024, topics=8, partitions=8, http_connections=64)
    assert http.reserve == plain.reserve + 64 and http.max_connections == plain.max_connections - 32
