"""The Python ceiling: the same socket and file I/O as logd, with no protocol at all.

Every logd figure in BENCHMARKS.md is reported as a ratio against this script
measured in the same run, on the same machine, with the same event loop
(trio), so the ratio isolates what the protocol and the server's bookkeeping
cost.

* ``ingest``: a server process receives with ``recv_into`` into one
  preallocated buffer per connection and ``os.write``s each receive to a file
  (optionally ``fdatasync``ing in a worker thread, one sync at a time covering
  everything written so far: group commit); N client connections stream
  ``--chunk``-byte buffers for ``--duration`` seconds, then half-close and wait
  for the server to finish writing.  No parsing, no CRC, no acknowledgements.
* ``read``: a server process ``sendfile``s one file to every connection in
  1 MiB calls, over and over; N clients ``recv_into`` and discard.
* ``reqrep`` and ``readone``: one request in flight per connection, as Go's
  ``log-cli bench`` and ``logd bench --in-flight 1`` run.  ``reqrep``: the
  client sends ``--chunk`` bytes, the server receives them all, ``os.write``s
  them to a file and answers one short line.  ``readone``: the client sends
  one short line, the server answers a short line and ``sendfile``s
  ``--chunk`` bytes of a file (cycling through it).  The figure that matters is
  the server's CPU per request (``server_cpu_us_per_request``).

Usage (prints one JSON object)::

    python benchmarks/baseline.py ingest --conns 16 --duration 2 --dir /dev/shm/bl [--fsync]
    python benchmarks/baseline.py read --conns 16 --duration 2 --file /dev/shm/bl/data
    python benchmarks/baseline.py reqrep --conns 16 --duration 2 --dir /dev/shm/bl
    python benchmarks/baseline.py readone --conns 16 --duration 2 --file /dev/shm/bl/data
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import stop_server

CHUNK = 1 << 20
RECV = 256 * 1024


# ---------------------------------------------------------------- server side


async def ingest_server(sock: trio.socket.SocketType, path: Path, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    dirty = trio.Event()

    async def syncer() -> None:
        nonlocal dirty
        while True:
            await dirty.wait()
            dirty = trio.Event()
            await trio.to_thread.run_sync(os.fdatasync, fd)

    async def handle(conn: trio.socket.SocketType) -> None:
        buf = bytearray(RECV)
        view = memoryview(buf)
        with conn:
            while True:
                n = await conn.recv_into(view)
                if n == 0:
                    break
                os.write(fd, view[:n])
                dirty.set()
            await conn.send(b"done")

    async with trio.open_nursery() as nursery:
        if fsync:
            nursery.start_soon(syncer)
        while True:
            conn, _ = await sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(handle, conn)


async def read_server(sock: trio.socket.SocketType, path: Path) -> None:
    async def handle(conn: trio.socket.SocketType) -> None:
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        out = conn.fileno()
        try:
            with conn:
                while True:
                    pos = 0
                    while pos < size:
                        try:
                            pos += os.sendfile(out, fd, pos, min(CHUNK, size - pos))
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(conn)
        except OSError:
            pass
        finally:
            os.close(fd)

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await sock.accept()
            nursery.start_soon(handle, conn)


async def reqrep_server(sock: trio.socket.SocketType, path: Path, chunk: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)

    async def handle(conn: trio.socket.SocketType) -> None:
        buf = bytearray(chunk)
        view = memoryview(buf)
        with conn:
            while True:
                got = 0
                while got < chunk:
                    n = await conn.recv_into(view[got:])
                    if n == 0:
                        return
                    got += n
                os.write(fd, view)
                await conn.send(b"OK 0 1\r\n")

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(handle, conn)


async def readone_server(sock: trio.socket.SocketType, path: Path, chunk: int) -> None:
    async def handle(conn: trio.socket.SocketType) -> None:
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        out = conn.fileno()
        pos = 0
        try:
            with conn:
                while True:
                    line = b""
                    while not line.endswith(b"\n"):
                        data = await conn.recv(256)
                        if not data:
                            return
                        line += data
                    await conn.send(b"OK 0 1\r\n")
                    if pos + chunk > size:
                        pos = 0
                    end = pos + min(chunk, size)
                    while pos < end:
                        try:
                            pos += os.sendfile(out, fd, pos, end - pos)
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(conn)
        except OSError:
            pass
        finally:
            os.close(fd)

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(handle, conn)


async def server_main(args: argparse.Namespace) -> None:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(sock.getsockname()[1], flush=True)
    if args.mode == "ingest":
        await ingest_server(sock, Path(args.dir) / "data", args.fsync)
    elif args.mode == "reqrep":
        await reqrep_server(sock, Path(args.dir) / "data", args.chunk)
    elif args.mode == "readone":
        await readone_server(sock, Path(args.file), args.chunk)
    else:
        await read_server(sock, Path(args.file))


# ---------------------------------------------------------------- client side


async def ingest_client(port: int, conns: int, duration: float, chunk: int) -> dict[str, float]:
    data = memoryview(os.urandom(chunk))
    sent = 0

    async def one() -> None:
        nonlocal sent
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            while trio.current_time() < deadline:
                view = data
                while view:
                    n = await sock.send(view)
                    view = view[n:]
                sent += chunk
            sock.shutdown(socket.SHUT_WR)
            await sock.recv(16)  # the server has written everything

    t0 = time.perf_counter()
    deadline = trio.current_time() + duration
    async with trio.open_nursery() as nursery:
        for _ in range(conns):
            nursery.start_soon(one)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "bytes": sent, "mib_per_s": sent / dt / 2**20}


async def read_client(port: int, conns: int, duration: float) -> dict[str, float]:
    got = 0

    async def one() -> None:
        nonlocal got
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with sock:
            while trio.current_time() < deadline:
                n = await sock.recv_into(view)
                if n == 0:
                    break
                got += n

    t0 = time.perf_counter()
    deadline = trio.current_time() + duration
    async with trio.open_nursery() as nursery:
        for _ in range(conns):
            nursery.start_soon(one)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "bytes": got, "mib_per_s": got / dt / 2**20}


async def lockstep_client(port: int, conns: int, duration: float, chunk: int, mode: str) -> dict[str, float]:
    """One request in flight per connection: ``reqrep`` sends ``chunk`` bytes, ``readone`` a short line."""
    data = memoryview(os.urandom(chunk))
    reply = len(b"OK 0 1\r\n") + (chunk if mode == "readone" else 0)
    requests = 0
    moved = 0

    async def one() -> None:
        nonlocal requests, moved
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(max(reply, 4096))
        view = memoryview(buf)
        with sock:
            while trio.current_time() < deadline:
                out = data if mode == "reqrep" else memoryview(b"READ b 0 1\r\n")
                while out:
                    n = await sock.send(out)
                    out = out[n:]
                got = 0
                while got < reply:
                    n = await sock.recv_into(view[got:])
                    if n == 0:
                        raise RuntimeError("baseline server closed the connection")
                    got += n
                requests += 1
                moved += chunk

    t0 = time.perf_counter()
    deadline = trio.current_time() + duration
    async with trio.open_nursery() as nursery:
        for _ in range(conns):
            nursery.start_soon(one)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "bytes": moved, "mib_per_s": moved / dt / 2**20, "requests": requests,
            "requests_per_s": requests / dt}


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(mode: str, conns: int, duration: float, *, directory: Path | None = None, file: Path | None = None,
        fsync: bool = False, chunk: int = 65536) -> dict[str, float]:
    """Start the baseline server process, load it, stop it; the client's figures."""
    cmd = [sys.executable, __file__, "_server", mode, "--chunk", str(chunk)]
    if mode in ("ingest", "reqrep"):
        assert directory is not None
        directory.mkdir(parents=True, exist_ok=True)
        cmd += ["--dir", str(directory)] + (["--fsync"] if fsync else [])
    else:
        assert file is not None
        cmd += ["--file", str(file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        c0 = _cpu_s(proc.pid)
        if mode == "ingest":
            res = trio.run(ingest_client, port, conns, duration, chunk)
        elif mode == "read":
            res = trio.run(read_client, port, conns, duration)
        else:
            res = trio.run(lockstep_client, port, conns, duration, chunk, mode)
        res["server_cpu_s"] = _cpu_s(proc.pid) - c0
        if res.get("requests"):
            res["server_cpu_us_per_request"] = res["server_cpu_s"] / res["requests"] * 1e6
        return res
    finally:
        stop_server(proc)
        if mode in ("ingest", "reqrep") and directory is not None:
            (directory / "data").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["ingest", "read", "reqrep", "readone", "_server"])
    ap.add_argument("server_mode", nargs="?", choices=["ingest", "read", "reqrep", "readone"])
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--chunk", type=int, default=65536, help="bytes per client send (ingest)")
    ap.add_argument("--dir", default="/dev/shm/logd-baseline")
    ap.add_argument("--file", help="file to serve (read)")
    ap.add_argument("--fsync", action="store_true")
    args = ap.parse_args()
    if args.mode == "_server":
        args.mode = args.server_mode
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(server_main, args)
        return
    res = run(args.mode, args.conns, args.duration, directory=Path(args.dir),
              file=Path(args.file) if args.file else None, fsync=args.fsync, chunk=args.chunk)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
