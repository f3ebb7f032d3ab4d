"""``logd write``: messages from arguments, a file or stdin, written in batches."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, BinaryIO, TextIO

import trio
import typer

from logd_trio.client.failover import FailoverWriter, parse_hosts
from logd_trio.client.writer import Writer
from logd_trio.core.defaults import DEFAULT_ADDRESS
from logd_trio.core.errors import MessageTooLarge, Timeout, WriteFailed

from .errors import run
from .options import (
    HostOpt,
    RetriesOpt,
    Security,
    TimeoutOpt,
    TLSCAOpt,
    TLSCertOpt,
    TLSKeyOpt,
    TLSOpt,
    TokenOpt,
    TopicOpt,
    VerboseOpt,
    cluster_give_up,
    cluster_security,
    connect_client,
    duration,
)


def _check_batch_size(value: int) -> int:
    if 0 < value < 64:
        raise typer.BadParameter("must be 0 (the server's maximum) or at least 64")
    return value


def _summary(acked: int, counts: list[int], start: float) -> None:
    elapsed = max(trio.current_time() - start, 1e-9)
    mb = counts[1] / 1e6
    typer.echo(f"{acked} messages, {mb:.1f} MB in {elapsed:.2f} s "
               f"({acked / elapsed:,.0f} msgs/s, {mb / elapsed:.1f} MB/s)", err=True)


CHUNK = 1 << 20
# Batches in flight on the connection (the server reads ahead 128 requests): with fsync
# always, one fsync then covers up to 8 MiB of 64 KiB batches instead of 2 MiB.  Bigger
# batches are fewer in flight (8 MiB of them, at least one), so what the writer holds stays
# bounded whatever the batch size (max_pending: the batch size times in flight + 1).
IN_FLIGHT = 128
IN_FLIGHT_BYTES = 8 << 20
# Linux's F_SETPIPE_SZ (not in the fcntl module before Python 3.10 on every platform).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@contextlib.asynccontextmanager
async def _pipe_chunks(fd: int) -> AsyncIterator[Callable[[], Awaitable[bytes]] | None]:
    """For a pipe or socket ``fd``: a non-blocking reader of chunks on the Trio thread (no
    thread hop per chunk; a FIFO grows to 1 MiB so that each read gets much), else None.
    The descriptor's flags are restored on the way out (they are shared with whoever
    else holds the pipe)."""
    try:
        mode = os.fstat(fd).st_mode if fd >= 0 else 0
    except OSError:
        mode = 0
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        yield None
        return
    if stat.S_ISFIFO(mode):
        with contextlib.suppress(OSError):  # beyond /proc/sys/fs/pipe-max-size: keep the size
            fcntl.fcntl(fd, _F_SETPIPE_SZ, CHUNK)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        yield lambda: _read_pipe(fd)
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)


async def _read_pipe(fd: int) -> bytes:
    """Up to CHUNK bytes (b"" at EOF); waits for readability only when nothing is there."""
    try:
        data = os.read(fd, CHUNK)
    except BlockingIOError:
        pass
    else:
        await trio.lowlevel.checkpoint()  # got data without waiting: let the writer's tasks run
        return data
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            continue


def _chunk_reader(f: BinaryIO, size: int = CHUNK) -> Callable[[], bytes]:
    """A blocking "read up to 1 MiB" for ``f``.  On a real descriptor it is ``os.read``:
    a read abandoned by Ctrl-C then holds no lock of ``sys.stdin`` at interpreter exit."""
    try:
        fd = f.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        read = getattr(f, "read1", f.read)
        return lambda: bytes(read(size))
    return lambda: os.read(fd, size)


def write(
    messages: Annotated[list[str] | None, typer.Argument(help="Messages; without any, read lines from stdin.")] = None,
    host: HostOpt = DEFAULT_ADDRESS,
    topic: TopicOpt = "default",
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Max batch size in bytes (0: the server's max).",
                          callback=_check_batch_size)
    ] = 0,
    flush_interval: Annotated[
        float, typer.Option("--flush-interval", parser=duration, metavar="DURATION",
                            help="Send a partial batch after this long (0.4, 400ms, 1m30s...).")
    ] = 0.4,
    input_file: Annotated[
        Path | None, typer.Option("--input", "-i", help="Read messages (one per line) from FILE.")
    ] = None,
    count: Annotated[bool, typer.Option(
        "--count", help="Print a summary (messages, MB, rate) to stderr, also when interrupted.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print the offset of each batch.")] = False,
    retries: RetriesOpt = 3,
    timeout: TimeoutOpt = None,
    verbose: VerboseOpt = False,
    tls: TLSOpt = False,
    tls_ca: TLSCAOpt = None,
    tls_cert: TLSCertOpt = None,
    tls_key: TLSKeyOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write messages: each argument, or each non-empty input line, is one message.

    Prints the offset of each acknowledged batch (until stdout is closed: then it
    goes on writing quietly).  Ctrl-C flushes what was read first.
    """
    security = Security(tls, tls_ca, tls_cert, tls_key, token)
    out = _AckPrinter(sys.stdout)

    async def feed(w: Writer | FailoverWriter, counts: list[int]) -> None:
        try:
            if messages:
                for m in messages:
                    data = m.encode()
                    await w.write(data)
                    counts[0] += 1
                    counts[1] += len(data)
            else:
                await _write_lines(w, input_file, counts)
        except MessageTooLarge:
            await w.flush()  # the messages before it are written first (leaving on an error does not flush)
            raise

    async def main() -> None:
        start = trio.current_time()
        counts = [0, 0]  # messages queued, their bytes
        writers: list[Writer | FailoverWriter] = []
        try:
            if "," in host:  # a cluster: follow the leader, resend after a failover (at-least-once)
                async with FailoverWriter(parse_hosts(host), topic, batch_size=batch_size or 65536,
                                          timeout=timeout or 10.0, on_ack=None if quiet else out,
                                          give_up=cluster_give_up(retries),
                                          secure=cluster_security(security)) as fw:
                    writers.append(fw)
                    await feed(fw, counts)
            else:
                async with (
                    connect_client(host, retries, timeout, security) as client,
                    client.writer(topic, batch_size=batch_size or None, flush_interval=flush_interval,
                                  max_in_flight=IN_FLIGHT, max_in_flight_bytes=IN_FLIGHT_BYTES,
                                  on_ack=None if quiet else out, ack_timeout=timeout) as w,
                ):
                    writers.append(w)
                    await feed(w, counts)
        except BaseException as exc:
            out.flush()
            used = writers[0] if writers else None
            failed = used.failed if isinstance(used, Writer) else []
            if failed and not isinstance(exc, WriteFailed):
                lost = sum(b.count for b in failed)
                typer.echo(f"logd write: {lost} message(s) were not written: {failed[0].error}", err=True)
            elif (isinstance(used, FailoverWriter) and used.pending_messages
                  and not isinstance(exc, WriteFailed | Timeout)):  # those say how many
                typer.echo(f"logd write: {used.pending_messages} message(s) may not have been written: "
                           f"{exc or type(exc).__name__}", err=True)  # their fate is unknown
            if count:  # also when interrupted: what was acknowledged by then
                _summary(writers[0].acked_messages if writers else 0, counts, start)
            raise
        out.flush()
        if count:
            _summary(writers[0].acked_messages, counts, start)

    run("write", main, verbose=verbose)


class _AckPrinter:
    """``on_ack`` for ``logd write``: prints each batch's offset.  Once stdout is closed
    (``logd write | head``) it stops printing, and the writer goes on writing."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.closed = False

    def __call__(self, offset: int, count: int) -> None:
        if not self.closed:
            try:
                self.out.write(f"{offset}\n")
            except BrokenPipeError:
                self._gone()

    def flush(self) -> None:
        if not self.closed:
            try:
                self.out.flush()
            except BrokenPipeError:
                self._gone()

    def _gone(self) -> None:
        self.closed = True
        # What is still buffered goes to /dev/null, so interpreter exit does not fail on it.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)


async def _write_lines(w: Writer | FailoverWriter, input_file: Path | None, counts: list[int]) -> None:
    """Write each non-empty line of the input (stdin by default), counting messages and bytes
    queued in ``counts`` as it goes.  Shows progress on stderr for ``--input`` files when
    stderr is a terminal.  A pipe or socket is read on the Trio thread without blocking
    (:func:`_pipe_chunks`); a file or terminal in a worker thread, a chunk at a time.
    """
    f: BinaryIO = (
        await trio.to_thread.run_sync(input_file.open, "rb") if input_file else sys.stdin.buffer
    )
    progress = input_file is not None and sys.stderr.isatty()
    size = os.fstat(f.fileno()).st_size if progress else 0
    seen = 0
    shown = trio.current_time()
    longest = w.batch_size  # no message is longer
    rest = b""
    read_chunk = _chunk_reader(f)
    try:
        fd = f.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        fd = -1
    try:
        async with _pipe_chunks(fd) as read_pipe:
            while True:
                if read_pipe is not None:
                    chunk = await read_pipe()
                else:
                    chunk = await trio.to_thread.run_sync(read_chunk, abandon_on_cancel=True)
                if not chunk:
                    break
                seen += len(chunk)
                cr = b"\r" in chunk or rest.endswith(b"\r")  # a CRLF ending to strip (one memchr)
                lines = chunk.split(b"\n")
                if rest:
                    lines[0] = rest + lines[0]
                rest = lines.pop()  # after the last newline: the start of a line
                if lines:
                    await _write_lines_of(w, lines, counts, cr)
                if len(rest) > longest:  # it can never be sent: don't buffer more of it
                    raise MessageTooLarge(f"a line of more than {longest} bytes cannot be written "
                                          f"(the batch size is {longest} bytes)")
                if progress and trio.current_time() - shown > 0.2:
                    shown = trio.current_time()
                    pct = 100 * seen / size if size else 100.0
                    sys.stderr.write(f"\r{pct:5.1f}%  {counts[0]} messages")
                    sys.stderr.flush()
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if rest:
            await w.write(rest)
            counts[0] += 1
            counts[1] += len(rest)
    finally:
        if input_file:
            f.close()
        if progress:
            sys.stderr.write(f"\r100.0%  {counts[0]} messages\n")


async def _write_lines_of(w: Writer | FailoverWriter, lines: list[bytes], counts: list[int], cr: bool) -> None:
    """Write each non-empty one of ``lines`` (complete lines, newline removed; a CRLF ending
    counts as one; ``cr``: some line may end in CR) with one ``write_many`` for the lot:
    C-level work per line."""
    if cr:
        lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    lines = list(filter(None, lines))
    try:
        counts[0] += await w.write_many(lines)
    except MessageTooLarge:
        # Nothing of these was queued: write the lines before the one too large, then fail.
        for line in lines:
            await w.write(line)  # raises at the first one too large
            counts[0] += 1
            counts[1] += len(line)
        raise
    counts[1] += sum(map(len, lines))


def register(app: typer.Typer) -> None:
    app.command(name="write")(write)
