"""``logd write``'s input: a pipe is read on the Trio thread without blocking (grown to 1 MiB,
its flags restored after), each line one message wherever the reads cut it; a line that can
never fit a batch fails without being buffered to its end; only the module of the command
run is imported."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from cli import main as cli_main
from cli.write_cmd import CHUNK, IN_FLIGHT, IN_FLIGHT_BYTES, _pipe_chunks, _write_lines
from logd_trio.client.client import Client, open_client
from logd_trio.core.errors import MessageTooLarge

from ..harness import local_config, start_server

_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_PIPE_MAX = int(Path("/proc/sys/fs/pipe-max-size").read_text())


async def test_a_pipe_is_read_without_blocking_then_restored() -> None:
    r, w = os.pipe()
    try:
        before = fcntl.fcntl(r, fcntl.F_GETFL)
        got = bytearray()
        async with _pipe_chunks(r) as read, trio.open_nursery() as n:
            assert read is not None
            assert fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(r, _F_GETPIPE_SZ) >= min(CHUNK, _PIPE_MAX)

            async def produce() -> None:
                for i in range(50):
                    await trio.to_thread.run_sync(os.write, w, b"%d\n" % i * 1000)
                    await trio.lowlevel.checkpoint()
                os.close(w)

            n.start_soon(produce)
            while chunk := await read():  # waits for readability when the pipe is empty
                got += chunk
        assert bytes(got) == b"".join(b"%d\n" % i * 1000 for i in range(50))
        assert fcntl.fcntl(r, fcntl.F_GETFL) == before  # shared with the other holders of the pipe
    finally:
        os.close(r)


async def test_a_regular_file_is_not_read_as_a_pipe(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x\n")
    with p.open("rb") as f:
        async with _pipe_chunks(f.fileno()) as read:
            assert read is None
        assert not fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def test_a_command_imports_only_its_module() -> None:
    assert cli_main._modules_for(["write", "--topic", "t", "x"]) == ("write_cmd",)
    assert cli_main._modules_for(["ping"]) == ("info_cmds",)
    assert cli_main._modules_for(["--help"]) == cli_main._ALL
    assert cli_main._modules_for([]) == cli_main._ALL
    assert cli_main._modules_for(["no-such-command"]) == cli_main._ALL
    code = ("import sys; sys.argv = ['logd', 'write', '--help']; from logd_trio_cli import main\n"
            "try:\n    main.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('logd_trio.server', 'logd_trio.tools'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "Usage: logd write" in out.stdout
    assert out.stdout.strip().endswith("[]"), out.stdout[-300:]  # neither the server nor the bench engine
    assert {"serve", "write", "read", "bench", "ping"} <= {c.name for c in cli_main.app.registered_commands}


@asynccontextmanager
async def stdin_pipe(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[io.FileIO]:
    """``sys.stdin`` reads a fresh pipe; yields the pipe's write end (closed on the way out)."""
    r, w = os.pipe()
    reader = io.TextIOWrapper(os.fdopen(r, "rb"))
    monkeypatch.setattr(sys, "stdin", reader)
    with reader, os.fdopen(w, "wb", buffering=0) as writer:
        assert isinstance(writer, io.FileIO)
        yield writer


async def stored(client: Client, topic: str) -> list[bytes]:
    async with client.scanner(topic) as s:
        return [m.body async for m in s]


async def test_each_line_is_one_message_wherever_the_reads_cut_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [b"one\ntw", b"o\r", b"\n\n\nthr", b"ee\r\nfour\n" + b"5" * 3000, b"\nlast, no newline"]
    async with trio.open_nursery() as n:
        server = await start_server(n, local_config(tmp_path))
        async with open_client(server.addr) as c, stdin_pipe(monkeypatch) as w:
            counts = [0, 0]
            async with c.writer("lines", flush_interval=None) as writer:
                async def produce() -> None:
                    for piece in pieces:
                        w.write(piece)
                        await trio.testing.wait_all_tasks_blocked()  # read, and waiting for more
                    w.close()

                n.start_soon(produce)
                await _write_lines(writer, None, counts)
            want = [b"one", b"two", b"three", b"four", b"5" * 3000, b"last, no newline"]
            assert await stored(c, "lines") == want
            assert counts == [len(want), sum(map(len, want))]
        await server.stop()


async def test_a_line_longer_than_a_batch_fails_before_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lines before it are written; the endless one is not buffered until EOF (there is none)."""
    async with trio.open_nursery() as n:
        server = await start_server(n, local_config(tmp_path))
        async with open_client(server.addr) as c, stdin_pipe(monkeypatch) as w:
            producing = trio.CancelScope()

            async def produce() -> None:
                w.write(b"before\n" + b"x" * 1000)
                os.set_blocking(w.fileno(), False)
                with producing:  # until the failure below
                    while True:
                        await trio.lowlevel.wait_writable(w)
                        with contextlib.suppress(BlockingIOError):
                            w.write(b"x" * 4096)

            n.start_soon(produce)
            counts = [0, 0]
            with pytest.raises(MessageTooLarge, match="a line of more than 2000 bytes"), trio.fail_after(60):
                async with c.writer("big", batch_size=2000) as writer:
                    await _write_lines(writer, None, counts)
            producing.cancel()
            assert counts[0] == 1
            assert await stored(c, "big") == [b"before"]
        await server.stop()


async def test_a_line_too_large_among_others_fails_after_the_ones_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with trio.open_nursery() as n:
        server = await start_server(n, local_config(tmp_path))
        async with open_client(server.addr) as c, stdin_pipe(monkeypatch) as w:
            w.write(b"a\nb\n" + b"y" * 1990 + b"\nnever\n")  # one read: one write_many
            w.close()
            counts = [0, 0]
            with pytest.raises(MessageTooLarge, match="message of 1990 bytes"):
                async with c.writer("mixed", batch_size=2000) as writer:
                    await _write_lines(writer, None, counts)
            assert counts == [2, 2]
            assert await stored(c, "mixed") == [b"a", b"b"]
        await server.stop()


async def test_lines_from_a_pipe_go_in_full_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines are framed into batches as full as the batch size allows, across reads too (not
    one batch per read or per line, each then waiting for its own fsync)."""
    lines = [b"%05d " % i + b"z" * 94 for i in range(5000)]  # 500 KB: several reads of the pipe
    async with trio.open_nursery() as n:
        server = await start_server(n, local_config(tmp_path))
        async with open_client(server.addr) as c, stdin_pipe(monkeypatch) as w:
            async def produce() -> None:
                await trio.to_thread.run_sync(w.write, b"\n".join(lines) + b"\n")
                w.close()

            n.start_soon(produce)
            counts = [0, 0]
            acks: list[int] = []
            async with c.writer("full", flush_interval=None, on_ack=lambda offset, count: acks.append(count)) as writer:
                await _write_lines(writer, None, counts)
                per_batch = writer._b.body_limit // (len(lines[0]) + len(b"MSG 100\r\n") + 2)
            assert acks[:-1] == [per_batch] * (len(acks) - 1) and sum(acks) == len(lines)
            assert await stored(c, "full") == lines
        await server.stop()


async def test_a_line_too_large_with_several_hosts_fails_after_writing_the_others(tmp_path: Path) -> None:
    """``--host a,b`` (the failover writer): every line before it is stored, then it fails."""
    given = tmp_path / "lines"
    lines = [b"line%05d" % i for i in range(5000)]
    given.write_bytes(b"".join(m + b"\n" for m in lines) + b"z" * 5000 + b"\nafter\n")
    async with trio.open_nursery() as n:
        server = await start_server(n, local_config(tmp_path / "data"))
        address = server.addr
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, "-m", "logd_trio_cli.main", "write", "--topic", "fw", "--host", f"{address},{address}",
                 "--batch-size", "2000", "--input", str(given), "--quiet"],
                capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode != 0
        assert b"message of 5000 bytes does not fit in a batch of 2000" in done.stderr, done.stderr
        async with open_client(server.addr) as c:
            assert await stored(c, "fw") == lines
        await server.stop()


async def test_what_logd_write_holds_is_bounded_whatever_the_batch_size(tmp_path: Path) -> None:
    """128 batches of 64 KiB in flight, but 2 of 4 MiB: in flight and max_pending about 8 MiB."""
    async with trio.open_nursery() as n:
        server = await start_server(n, local_config(tmp_path, batch_size=16 << 20))
        async with open_client(server.addr) as c:
            for size, in_flight in [(64 << 10, 128), (4 << 20, 2), (16 << 20, 1)]:
                async with c.writer("b", batch_size=size, max_in_flight=IN_FLIGHT,
                                    max_in_flight_bytes=IN_FLIGHT_BYTES) as w:
                    assert (w.max_in_flight, w.max_pending) == (in_flight, size * (in_flight + 1)), size
                    await w.write_many([b"m" * 1000] * (3 * size // 1000))  # sent through the smaller window
                assert w.acked_messages == 3 * size // 1000
        await server.stop()
