"""``logd serve --workers 2``: real processes, real sockets, raw-protocol clients.

Which process serves a client is told by the ``-v`` log lines: the owner's
``connection from 127.0.0.1:PORT opened``, a worker's ``worker 0 (pid N):
connection from 127.0.0.1:PORT``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from logd_trio.server.config import ConfigError, ServerConfig

from ...harness import ServerProcess, make_config, spawn, start_server
from ...wire import Wire, batch_request
from ..gates import GatedSync

CONNS = 20  # the kernel spreads them by hash: all on one process has odds 2 * 2**-20
WORKER_LINE = re.compile(rb"worker 0 \(pid (\d+)\): connection from 127\.0\.0\.1:(\d+)")
READY_LINE = re.compile(rb"worker 0 \(pid (\d+)\) listening")


async def _serve(nursery: trio.Nursery, root: Path, *args: str) -> ServerProcess:
    srv = await spawn(nursery, root, "--workers", "2", "--fsync", "never", "-v", *args)
    with trio.fail_after(20):  # the worker's ready line (it may come after the owner's)
        while not READY_LINE.search(srv.log):  # noqa: ASYNC110 (polls another process's log)
            await trio.sleep(0.05)
    return srv


def _worker_pids(srv: ServerProcess) -> list[int]:
    return [int(m.group(1)) for m in READY_LINE.finditer(srv.log)]


async def _connect_all(srv: ServerProcess, n: int = CONNS) -> tuple[list[Wire], set[int]]:
    """``n`` connections, each answered once (PING), and the local ports a worker serves."""
    wires = [await Wire.connect(srv.host, srv.port) for _ in range(n)]
    for w in wires:
        await w.send(b"PING\r\n")
        assert await w.line() == b"PONG\r\n"
    ports = {w.stream.socket.getsockname()[1] for w in wires}
    with trio.fail_after(10):  # every connection logged by one of the processes
        while True:
            on_worker = {int(m.group(2)) for m in WORKER_LINE.finditer(srv.log)} & ports
            on_owner = {int(m.group(1)) for m in re.finditer(rb"connection from 127\.0\.0\.1:(\d+) opened",
                                                                srv.log)} & ports
            if on_worker | on_owner == ports:
                break
            await trio.sleep(0.05)
    assert on_worker and on_owner, "all connections reached one process"
    return wires, on_worker


def _port(w: Wire) -> int:
    return int(w.stream.socket.getsockname()[1])


async def _write(w: Wire, topic: str, msg: bytes) -> int:
    await w.send(batch_request(topic, [msg]))
    reply = await w.line()
    assert reply.startswith(b"OK "), reply
    return int(reply.split()[1])


async def _stop(srv: ServerProcess) -> None:
    srv.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        assert await srv.proc.wait() == 0


def _deleted_files(pid: int) -> list[str]:
    """The removed files the process still holds open."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.endswith(" (deleted)") and (target.endswith(".log (deleted)") or ".index" in target):
            out.append(target)
    return out


def _open_data_files(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


async def test_a_batch_acked_on_one_connection_is_readable_on_every_other(nursery: trio.Nursery,
                                                                          tmp_path: Path) -> None:
    srv = await spawn(nursery, tmp_path / "d", "--workers", "2", "-v")  # fsync always
    wires, on_worker = await _connect_all(srv)
    with trio.fail_after(30):
        for rnd in range(5):
            writer = wires[rnd * 3 % len(wires)]
            msg = b"round %d" % rnd
            off = await _write(writer, "t", msg)
            for w in wires:  # at once: no wait between the OK and the READs
                await w.send(b"READ t %d 1\r\n" % off)
            for w in wires:
                head, frames = await w.read_reply()
                assert head == b"OK %d 1\r\n" % off and len(frames) == 1, (_port(w), head)
                assert msg + b"\r\n" in frames[0]
        owner = next(w for w in wires if _port(w) not in on_worker)
        await owner.send(b"STATS\r\n")
        stats = await owner.reply()
    reads = int(re.search(rb"requests\.read: (\d+)", stats).group(1))  # type: ignore[union-attr]
    # the owner answered its own clients' READs; the worker its clients' (the first round's perhaps
    # relayed: the owner publishes a new topic's head from its second acknowledgement at the latest)
    assert 5 * (len(wires) - len(on_worker)) <= reads <= 5 * len(wires) - 4 * len(on_worker)
    await _stop(srv)


async def test_replies_keep_their_order_on_a_pipelined_worker_connection(nursery: trio.Nursery,
                                                                         tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d")
    wires, on_worker = await _connect_all(srv)
    w = next(w for w in wires if _port(w) in on_worker)
    b1, b2 = batch_request("p", [b"one"]), batch_request("p", [b"two", b"three"])
    with trio.fail_after(30):
        await w.send(b1 + b"READ p 0 10\r\n" + b2 + b"READ p %d 10\r\nPING\r\nTAIL p 10\r\nTOPICS\r\n"
                     b"READ p 999999 1\r\nREAD nope 0 1\r\nBATCH 4 p 1 1\r\nxx\r\n" % len(b1) + b"READ p 0 1\r\n")
        assert await w.line() == b"OK 0 1\r\n"
        head, frames = await w.read_reply()
        assert head == b"OK 0 1\r\n" and b"one" + b"\r\n" in frames[0]
        assert await w.line() == b"OK %d 1\r\n" % len(b1)
        head, frames = await w.read_reply()  # the READ after the second BATCH sees it
        assert head == b"OK %d 1\r\n" % len(b1) and b"three" + b"\r\n" in frames[0]
        assert await w.line() == b"PONG\r\n"
        head, frames = await w.read_reply()
        assert head == b"OK 0 2\r\n" and len(frames) == 2
        assert b"p: " in await w.reply()
        assert await w.line() == b"ERR not found\r\n"  # beyond the head: the owner's answer
        assert await w.line() == b"ERR not found\r\n"
        bad = await w.line()
        assert bad.startswith(b"ERR "), bad  # the owner's parser gives the same error, in order
        head, _ = await w.read_reply()
        assert head == b"OK 0 1\r\n"
    await _stop(srv)


async def test_a_killed_worker_is_restarted_and_new_clients_are_served(nursery: trio.Nursery,
                                                                       tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d")
    w0 = await Wire.connect(srv.host, srv.port)
    off = await _write(w0, "k", b"kept")
    (old,) = _worker_pids(srv)
    os.kill(old, signal.SIGKILL)
    with trio.fail_after(20):
        while len(_worker_pids(srv)) < 2:  # noqa: ASYNC110 (polls another process's log)
            await trio.sleep(0.05)
    new = _worker_pids(srv)[1]
    assert new != old and b"worker 0 (pid %d) exited with signal 9" % old in srv.log
    wires, on_worker = await _connect_all(srv)
    assert {int(m.group(1)) for m in WORKER_LINE.finditer(srv.log) if int(m.group(2)) in on_worker} == {new}
    with trio.fail_after(20):
        for w in wires:
            await w.send(b"READ k %d 1\r\n" % off)
            head, frames = await w.read_reply()
            assert head == b"OK %d 1\r\n" % off and b"kept" + b"\r\n" in frames[0]
    await _stop(srv)


async def test_shutdown_leaves_no_process(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d")
    (pid,) = _worker_pids(srv)
    await _connect_all(srv)
    await _stop(srv)
    with trio.fail_after(10):
        while not _gone(pid):  # noqa: ASYNC110 (polls /proc)
            await trio.sleep(0.05)
    assert b"worker 0 (pid %d) stopped" % pid in srv.log


async def test_delete_and_retention_while_workers_read(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d", "--partition-size", "4096", "--partitions", "2")
    wires, _ = await _connect_all(srv)
    w0 = wires[0]
    with trio.fail_after(60):
        offsets = [await _write(w0, "r", b"m%03d" % i + b"x" * 500) for i in range(40)]  # many rotations
        for w in wires:
            await w.send(b"READ r %d 1\r\nREAD r %d 1\r\n" % (offsets[0], offsets[-1]))
            assert await w.line() == b"ERR not found\r\n"  # dropped by retention
            head, frames = await w.read_reply()
            assert head == b"OK %d 1\r\n" % offsets[-1] and b"m039" in frames[0]
        for i in range(40):  # more partitions dropped, with no READ through the worker
            await _write(w0, "r", b"n%03d" % i + b"x" * 500)
        (pid,) = _worker_pids(srv)
        while _deleted_files(pid):  # noqa: ASYNC110 (polls /proc): the worker lets their space go
            await trio.sleep(0.1)
        await w0.send(b"DELETE r\r\n")
        assert await w0.line() == b"OK\r\n"
        for w in wires:
            await w.send(b"READ r %d 1\r\n" % offsets[-1])
            assert await w.line() == b"ERR not found\r\n"
        assert await _write(w0, "r", b"anew") == 0  # a new incarnation, from offset 0
        for w in wires:
            await w.send(b"READ r 0 5\r\n")
            head, frames = await w.read_reply()
            assert head == b"OK 0 1\r\n" and b"anew" + b"\r\n" in frames[0], head
    await _stop(srv)


@pytest.mark.parametrize(("option", "value", "why"), [
    ("tls_cert", "c.pem", "TLS"), ("auth_file", "a.toml", "an auth file"),
    ("replicate_from", "127.0.0.1:1", "replication"),
])
def test_workers_refuse_what_one_process_serves(option: str, value: str, why: str) -> None:
    extra = {"node_id": "n1"} if option == "replicate_from" else {}
    with pytest.raises(ConfigError, match=f"workers: 2 with {option}: {why} is served by one process"):
        ServerConfig(workers=2, **{option: value}, **extra)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="workers: must be at least 1"):
        ServerConfig(workers=0)


async def _all_until_closed(w: Wire) -> bytes:
    with trio.fail_after(20):
        assert await w.closed()
    return bytes(w.buf)


async def test_a_worker_gives_the_owners_replies_to_bad_requests(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d")
    wires, on_worker = await _connect_all(srv)
    on_w = next(w for w in wires if _port(w) in on_worker)
    on_o = next(w for w in wires if _port(w) not in on_worker)
    await _write(on_o, "t", b"x")
    bad = (b"FOO\r\nREAD t\r\nREAD t 0 1\nREAD t 0 0\r\nREAD t 3 1\r\nTAIL t 1\r\n"
           + batch_request("t", [b"y"]).replace(b"BATCH 10 t", b"BATCH 10 t/x") + b"READ t 0 1 notanumber\r\n"
           + b"BATCH 99999999 t 1 1\r\nPING\r\n")
    for w in (on_w, on_o):
        await w.send(bad)
    got_w, got_o = await _all_until_closed(on_w), await _all_until_closed(on_o)
    assert got_w == got_o and got_w.endswith(b"ERR batch too large\r\n") and got_w.count(b"ERR ") >= 5
    for w in wires:  # a request line that never ends
        if w not in (on_w, on_o):
            await w.send(b"READ " + b"x" * 5000)
            assert await _all_until_closed(w) == b"ERR request line too long\r\n"
    await _stop(srv)


async def test_a_worker_applies_the_request_and_idle_timeouts(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d", "--timeout", "1s", "--idle-timeout", "1s")
    wires, on_worker = await _connect_all(srv)
    started = trio.current_time()
    partial = [next(w for w in wires if _port(w) in on_worker), next(w for w in wires if _port(w) not in on_worker)]
    for w in partial:
        await w.send(b"READ t 0")  # a request that never ends: ERR timeout, on the worker as on the owner
    for w in wires:  # the others: closed when idle, without a word
        assert await _all_until_closed(w) == (b"ERR timeout\r\n" if w in partial else b"")
    assert trio.current_time() - started < 15
    await _stop(srv)


async def test_a_worker_never_serves_past_the_published_head(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[GatedSync], GatedSync]
) -> None:
    """A batch in the page cache whose fsync has not finished (fsync always) is served by no
    process: a READ from before it stops before it, a READ at it is the owner's ERR not found."""
    gate = syscall_layer(GatedSync())
    srv = await start_server(nursery, make_config(tmp_path / "d", workers=2))
    wires = [await Wire.connect(srv.host, srv.port) for _ in range(CONNS)]
    with trio.fail_after(30):
        first = await _write(wires[0], "h", b"acked")
        for w in wires:  # every process has the topic's files open, up to the head
            await w.send(b"READ h %d 10\r\n" % first)
            assert (await w.read_reply())[0] == b"OK %d 1\r\n" % first
        gate.armed = True
        await wires[0].send(batch_request("h", [b"held"]))
        assert await trio.to_thread.run_sync(gate.entered.wait, 10)
        held = first + len(batch_request("h", [b"acked"]))
        by_owner = await _reads_counted_by_owner(wires[1], wires[1:], b"READ h %d 10\r\n" % first)
        assert by_owner < len(wires) - 1, "no READ was served by the worker"  # (STATS counts the owner's)
        for w in wires[1:]:
            await w.send(b"READ h %d 10\r\nREAD h %d 10\r\n" % (first, held))
            head, frames = await w.read_reply()
            assert head == b"OK %d 1\r\n" % first and len(frames) == 1
            assert await w.line() == b"ERR not found\r\n"
        gate.armed = False
        gate.release.set()
        assert await wires[0].line() == b"OK %d 1\r\n" % held
        for w in wires[1:]:
            await w.send(b"READ h %d 10\r\n" % first)
            assert (await w.read_reply())[0] == b"OK %d 2\r\n" % first
    await srv.stop()


async def test_a_second_server_with_workers_cannot_share_the_port(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d")
    cmd = [sys.executable, "-m", "logd_trio_cli.main", "serve", "--host", f"127.0.0.1:{srv.port}", "--workdir",
           str(tmp_path / "other"), "--workers", "2", "--fsync", "never"]
    with trio.fail_after(30):  # it must fail at once; still running after that: it shares the port
        done = await trio.run_process(cmd, check=False, capture_stderr=True, stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and b"Address already in use" in done.stderr, done.stderr[-300:]
    await _stop(srv)


async def _reads_counted_by_owner(owner: Wire, wires: list[Wire], request: bytes) -> int:
    """How many of ``request`` sent once on each of ``wires`` the owner served (STATS before and after)."""
    async def count() -> int:
        await owner.send(b"STATS\r\n")
        return int(re.search(rb"requests\.read: (\d+)", await owner.reply()).group(1))  # type: ignore[union-attr]
    before = await count()
    for w in wires:
        await w.send(request)
        head, _ = await w.read_reply()
        assert head.startswith(b"OK "), head
    return await count() - before


async def _until(check: Callable[[], bool], what: str, limit: float = 15) -> None:
    with trio.move_on_after(limit):
        while not check():  # noqa: ASYNC110 (polls another process)
            await trio.sleep(0.05)
    assert check(), what


async def test_retention_by_age_is_published_to_the_workers(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d", "--partition-size", "4096", "--retention-time", "2s")
    wires, on_worker = await _connect_all(srv)
    (pid,) = _worker_pids(srv)
    with trio.fail_after(60):
        offsets = [await _write(wires[0], "a", b"m%03d" % i + b"x" * 500) for i in range(20)]
        for _ in range(2):  # (the first round's READs on the worker may be relayed)
            await _reads_counted_by_owner(wires[0], wires, b"READ a %d 1\r\n" % offsets[0])
        assert any(p.endswith(".log") for p in _open_data_files(pid)), "the worker has the topic open"
        await _until(lambda: b"retention removes" in srv.log, "retention by age ran")
        for w in wires:  # the idle topic's first moved: no process serves what retention dropped
            await w.send(b"READ a %d 1\r\n" % offsets[0])
            assert await w.line() == b"ERR not found\r\n", _port(w) in on_worker
        await _until(lambda: not _deleted_files(pid), "the worker closes the removed files")
    await _stop(srv)


async def test_retention_by_count_leaves_no_removed_file_open_on_a_worker(nursery: trio.Nursery,
                                                                         tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d", "--partition-size", "4096", "--partitions", "2")
    wires, on_worker = await _connect_all(srv)
    owner = next(w for w in wires if _port(w) not in on_worker)
    (pid,) = _worker_pids(srv)
    with trio.fail_after(60):
        for i in range(60):  # READs on the worker right after each OK: it reloads between publish and unlink
            off = await _write(owner, "c", b"m%03d" % i + b"x" * 500)
            for w in wires:
                if _port(w) in on_worker:
                    await w.send(b"READ c %d 1\r\n" % off)
                    head, _ = await w.read_reply()
                    assert head == b"OK %d 1\r\n" % off
        await _until(lambda: not _deleted_files(pid), "the worker closes the removed files (idle topic)", 5)
    await _stop(srv)


async def test_after_a_restart_the_scrub_lets_the_workers_serve_old_batches(nursery: trio.Nursery,
                                                                         tmp_path: Path) -> None:
    args = ("--partition-size", "1MiB", "--partitions", "100", "--scrub-rate", "32MiB")
    srv = await _serve(nursery, tmp_path / "d", *args)
    w0 = await Wire.connect(srv.host, srv.port)
    with trio.fail_after(60):
        for _ in range(50):
            await _write(w0, "b", b"y" * 60000)
    await _stop(srv)
    srv = await _serve(nursery, tmp_path / "d", *args)
    wires, on_worker = await _connect_all(srv)
    owner = next(w for w in wires if _port(w) not in on_worker)
    with trio.fail_after(60):
        await _until(lambda: b"scrub done" in srv.log, "the scrub finished")
        await _reads_counted_by_owner(owner, wires, b"READ b 0 1\r\n")  # (the worker opens the files)
        served = await _reads_counted_by_owner(owner, wires, b"READ b 0 1\r\n")
    assert served == len(wires) - len(on_worker), "the worker serves the verified batches itself"
    await _stop(srv)


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le"])
def test_workers_are_refused_off_x86_64(machine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)  # the machine, not the code under test
    with pytest.raises(ConfigError, match=f"workers: more than 1 needs an x86-64 machine .*this one is {machine}"):
        ServerConfig(workers=2)
    assert ServerConfig(workers=1).workers == 1


async def test_a_worker_out_of_descriptors_warns_once_not_per_retry(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await spawn(nursery, tmp_path / "d", "--workers", "2", "--fsync", "never", "-v", ulimit="-n 120")
    await _until(lambda: READY_LINE.search(srv.log) is not None, "the worker started")
    wires: list[trio.SocketStream] = []
    with trio.fail_after(30):
        while srv.log.count(b"worker 0: accept failed") == 0:  # the worker's descriptors run out
            assert len(wires) < 400, "the worker never ran out of descriptors"
            wires.append(await trio.open_tcp_stream(srv.host, srv.port))
        await trio.sleep(1.0)  # ten retries of its accept at 0.1 s, still failing
    assert srv.log.count(b"worker 0: accept failed") == 1
    for w in wires:
        await w.aclose()
    await _stop(srv)


async def test_the_owner_refuses_relays_beyond_its_connection_cap(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _serve(nursery, tmp_path / "d", "--max-connections", "3")
    wires = [await Wire.connect(srv.host, srv.port) for _ in range(CONNS)]
    admitted = []
    with trio.fail_after(30):
        for w in wires:
            await w.send(b"PING\r\n")
            if await w.line() == b"PONG\r\n":  # else refused by the process it reached (3 each)
                admitted.append(w)
        await _until(lambda: len(WORKER_LINE.findall(srv.log)) >= 3, "the worker logged its connections")
        on_worker = {int(m.group(2)) for m in WORKER_LINE.finditer(srv.log)}
        relayed = [w for w in admitted if _port(w) in on_worker]
        assert relayed and len(admitted) - len(relayed) == 3, "the owner is full with its own clients"
        for w in relayed:  # TOPICS is relayed: the owner has no room for another connection
            await w.send(b"TOPICS\r\n")
            assert await w.line() == b"ERR too many connections\r\n"
    await _stop(srv)


async def test_the_directory_of_an_owner_killed_earlier_is_removed_at_start(nursery: trio.Nursery, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lw", dir="/tmp"))  # short: the relay socket's path has a length limit
    monkeypatch.setattr("tempfile.tempdir", str(tmp))  # where this server makes its private directory
    dead, alive = tmp / "logd-workers-999999999-abc", tmp / "logd-workers-1-abc"
    for d in (dead, alive):
        d.mkdir()
        (d / "heads").write_bytes(b"x")
    srv = await start_server(nursery, make_config(tmp_path / "d", workers=2))
    assert not dead.exists() and alive.exists()  # (pid 1 runs: its directory may be in use)
    assert [n.startswith(f"logd-workers-{os.getpid()}-") for n in os.listdir(tmp) if n != alive.name] == [True]
    await srv.stop()
    try:
        assert os.listdir(tmp) == [alive.name]
    finally:
        shutil.rmtree(tmp)
