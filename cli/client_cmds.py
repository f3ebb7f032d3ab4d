"""Client subcommands (write, read, stats, config, topics, ping).

Thin translators: flags -> one library call.  Library errors become one line
on stderr and an exit code in :func:`_run` (``-v`` adds the traceback).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, BinaryIO, Final, TextIO

import trio
import typer

from logd_trio.client.checkpoint import FileCheckpoint
from logd_trio.client.client import DEFAULT_ADDRESS, Client, RetryPolicy, open_client, parse_address
from logd_trio.client.writer import Writer
from logd_trio.core.errors import (
    CheckpointError,
    ConnectionLost,
    LogdError,
    MessageTooLarge,
    NotFound,
    ServerRejected,
    Timeout,
    Unsupported,
    WriteFailed,
)
from logd_trio.core.replies import Message

# Exit codes, most specific first.  2 is click's usage error.
EXIT_CODES: Final[tuple[tuple[type[BaseException], int], ...]] = (
    (ConnectionLost, 3),
    (Timeout, 4),
    (NotFound, 5),
    (ServerRejected, 6),
    (WriteFailed, 7),
    (CheckpointError, 8),
    (MessageTooLarge, 9),
    (Unsupported, 10),
    (LogdError, 1),
    (OSError, 1),
)

def _check_host(value: str) -> str:
    try:
        parse_address(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _check_timeout(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter("must be a number of seconds > 0")
    return value


def _check_batch_size(value: int) -> int:
    if 0 < value < 64:
        raise typer.BadParameter("must be 0 (the server's maximum) or at least 64")
    return value


HostOpt = Annotated[
    str, typer.Option("--host", envvar="LOGD_HOST", help="Server address HOST:PORT.", callback=_check_host)
]
TopicOpt = Annotated[str, typer.Option("--topic", "-t", help="Topic name.")]
RetriesOpt = Annotated[
    int, typer.Option("--retries", min=1, help="Connection attempts before giving up (backoff between).")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", help="Seconds to wait for each reply (write: for each acknowledgement); default: none.",
                 callback=_check_timeout),
]


class Format(StrEnum):
    raw = "raw"
    json = "json"


def _err(text: str) -> None:
    typer.echo(text, err=True)


def _run(main: Callable[[], Awaitable[None]], verbose: bool) -> None:
    """Run ``main`` under trio; the one place where errors become exit codes."""
    try:
        trio.run(main)
    except KeyboardInterrupt:
        _err("logd: interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keep interpreter exit quiet
        raise typer.Exit(0) from None
    except (LogdError, OSError) as exc:
        if verbose:
            traceback.print_exc()
        _err(f"logd: error: {exc}")
        raise typer.Exit(_exit_code(exc)) from None


def _exit_code(exc: BaseException) -> int:
    """The exit code for ``exc``; a ``WriteFailed`` whose batches all timed out is a ``Timeout``."""
    if isinstance(exc, WriteFailed) and exc.failed and all(
        isinstance(getattr(b, "error", None), Timeout) for b in exc.failed
    ):
        exc = Timeout()
    return next(c for cls, c in EXIT_CODES if isinstance(exc, cls))


def _client(host: str, retries: int, timeout: float | None) -> AbstractAsyncContextManager[Client]:
    return open_client(host, retry=RetryPolicy(attempts=retries, initial=0.1, maximum=1.0),
                       request_timeout=timeout)


def parse_seconds(text: str) -> float:
    """``0.4``, ``400ms``, ``2s``, ``1m`` -> seconds (finite, >= 0)."""
    units = (("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
    t = text.strip()
    value: float | None = None
    for suffix, factor in units:
        if t.endswith(suffix):
            with contextlib.suppress(ValueError):
                value = float(t[: -len(suffix)]) * factor
            break
    else:
        with contextlib.suppress(ValueError):
            value = float(t)
    if value is None or not 0 <= value < math.inf:
        raise typer.BadParameter(f"{text!r} is not a duration >= 0 (examples: 0.4, 400ms, 2s)")
    return value


# ---------------------------------------------------------------- write


def _chunk_reader(f: BinaryIO, size: int = 1 << 20) -> Callable[[], bytes]:
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
        str, typer.Option("--flush-interval", help="Send a partial batch after this long (0.4, 400ms...).")
    ] = "400ms",
    input_file: Annotated[
        Path | None, typer.Option("--input", "-i", help="Read messages (one per line) from FILE.")
    ] = None,
    count: Annotated[bool, typer.Option("--count", help="Print a summary (messages, MB, rate) to stderr.")] = False,
    retries: RetriesOpt = 3,
    timeout: TimeoutOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Write messages: each argument, or each non-empty input line, is one message.

    Prints the offset of each acknowledged batch (until stdout is closed: then it
    goes on writing quietly).  Ctrl-C flushes what was read first.
    """
    try:
        interval = parse_seconds(flush_interval)
    except typer.BadParameter as exc:
        exc.param_hint = "'--flush-interval'"
        raise
    out = _AckPrinter(sys.stdout)

    async def main() -> None:
        start = trio.current_time()
        total = 0
        nbytes = 0
        writers: list[Writer] = []
        try:
            async with (
                _client(host, retries, timeout) as client,
                client.writer(topic, batch_size=batch_size or None, flush_interval=interval, on_ack=out,
                              ack_timeout=timeout) as w,
            ):
                writers.append(w)
                if messages:
                    for m in messages:
                        data = m.encode()
                        await w.write(data)
                        total += 1
                        nbytes += len(data)
                else:
                    total, nbytes = await _write_lines(w, input_file)
        except BaseException as exc:
            out.flush()
            failed = writers[0].failed if writers else []
            if failed and not isinstance(exc, WriteFailed):
                lost = sum(b.count for b in failed)
                _err(f"logd: {lost} message(s) were not written: {failed[0].error}")
            raise
        out.flush()
        if count:
            elapsed = max(trio.current_time() - start, 1e-9)
            mb = nbytes / 1e6
            _err(f"{total} messages, {mb:.1f} MB in {elapsed:.2f} s "
                 f"({total / elapsed:,.0f} msgs/s, {mb / elapsed:.1f} MB/s)")

    _run(main, verbose)


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


async def _write_lines(w: Writer, input_file: Path | None) -> tuple[int, int]:
    """Write each non-empty line of the input (stdin by default); returns (messages, bytes).

    Shows progress on stderr for ``--input`` files when stderr is a terminal.
    """
    total = nbytes = 0
    f: BinaryIO = (
        await trio.to_thread.run_sync(input_file.open, "rb") if input_file else sys.stdin.buffer
    )
    progress = input_file is not None and sys.stderr.isatty()
    size = os.fstat(f.fileno()).st_size if progress else 0
    seen = 0
    shown = trio.current_time()
    rest = b""
    read_chunk = _chunk_reader(f)
    try:
        while True:
            chunk = await trio.to_thread.run_sync(read_chunk, abandon_on_cancel=True)
            if not chunk:
                break
            seen += len(chunk)
            data = rest + chunk if rest else chunk
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            block = data[:cut]
            if b"\r" in block:
                block = block.replace(b"\r\n", b"\n")
            lines = [ln for ln in block.split(b"\n") if ln]
            total += await w.write_many(lines)
            nbytes += sum(map(len, lines))
            if progress and trio.current_time() - shown > 0.2:
                shown = trio.current_time()
                pct = 100 * seen / size if size else 100.0
                sys.stderr.write(f"\r{pct:5.1f}%  {total} messages")
                sys.stderr.flush()
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if rest:
            await w.write(rest)
            total += 1
            nbytes += len(rest)
    finally:
        if input_file:
            f.close()
        if progress:
            sys.stderr.write(f"\r100.0%  {total} messages\n")
    return total, nbytes


# ---------------------------------------------------------------- read


def _format(msg: Message, fmt: Format, numbers: bool) -> bytes:
    if fmt is Format.json:
        obj: dict[str, object] = {"topic": msg.topic, "offset": msg.offset, "delta": msg.delta}
        try:
            obj["body"] = msg.body.decode("utf-8")
        except UnicodeDecodeError:
            obj["body_base64"] = base64.b64encode(msg.body).decode("ascii")
        return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"
    if numbers:
        return b"%d:%d\t%s\n" % (msg.offset, msg.delta, msg.body)
    return msg.body + b"\n"


def read(
    host: HostOpt = DEFAULT_ADDRESS,
    topic: TopicOpt = "default",
    offset: Annotated[int | None, typer.Option("--offset", "-o", min=0, help="Start at this batch offset.")] = None,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the oldest retained message (ignore a checkpoint).")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", "-l", min=0, help="Stop after N messages (0: no limit).")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep waiting for new messages.")] = False,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", "-c", help="Resume from and record progress in FILE.")
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="raw: one body per line; json: one object.")] = (
        Format.raw
    ),
    numbers: Annotated[bool, typer.Option("--numbers", "-n", help="Prefix raw lines with OFFSET:DELTA.")] = False,
    retries: RetriesOpt = 3,
    timeout: TimeoutOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Read messages, by default from the oldest retained one to the end of the log."""
    if offset is not None and from_beginning:
        raise typer.BadParameter("use either --offset or --from-beginning")
    out = sys.stdout.buffer

    async def main() -> None:
        async with _client(host, retries, timeout) as client:
            cp = FileCheckpoint(checkpoint) if checkpoint else None
            async with client.scanner(topic, offset=offset, from_beginning=from_beginning, checkpoint=cp,
                                      limit=limit or None, follow=follow, read_size=5000) as scanner:
                async for msg in scanner:
                    out.write(_format(msg, fmt, numbers))
                    if follow:
                        out.flush()
        out.flush()

    _run(main, verbose)


# ---------------------------------------------------------------- info commands


def _info(host: str, retries: int, timeout: float | None, verbose: bool,
          call: Callable[[Client], Awaitable[str]]) -> None:
    async def main() -> None:
        async with _client(host, retries, timeout) as client:
            typer.echo(await call(client))

    _run(main, verbose)


def stats(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
          verbose: VerboseOpt = False) -> None:
    """Print the server's counters."""

    async def call(c: Client) -> str:
        return "\n".join(f"{k}: {v}" for k, v in (await c.stats()).items())

    _info(host, retries, timeout, verbose, call)


def config(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
           verbose: VerboseOpt = False) -> None:
    """Print the server's configuration (CONFIG)."""

    async def call(c: Client) -> str:
        return "\n".join(f"{k}: {v}" for k, v in (await c.config()).fields.items())

    _info(host, retries, timeout, verbose, call)


def topics(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
           verbose: VerboseOpt = False) -> None:
    """List topics with their first and head offsets (logd-trio servers)."""

    async def call(c: Client) -> str:
        return "\n".join(f"{name}: {first} {head}" for name, (first, head) in (await c.topics()).items())

    _info(host, retries, timeout, verbose, call)


def ping(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
         verbose: VerboseOpt = False) -> None:
    """Check that the server answers; prints the round-trip time."""

    async def call(c: Client) -> str:
        rtt = await c.ping()
        return f"PONG from {c.address} in {rtt * 1000:.2f} ms"

    _info(host, retries, timeout, verbose, call)


def register(app: typer.Typer) -> None:
    """Add the client commands to ``app``."""
    for fn in (write, read, stats, config, topics, ping):
        app.command(name=fn.__name__)(fn)
