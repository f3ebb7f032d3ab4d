"""The engine of ``logd bench``: pipelined raw BATCH / READ load over trio sockets.

Client side, like Go's ``log-cli bench``: it uses only the pure core
(:mod:`logd_trio.core.framing`) and trio sockets, never the client library, so what
it measures is the server plus the kernel.

Write phase: every connection sends the same pre-built request over and over
(``--size`` bytes including the ``BATCH`` line, messages of ``--message-size``
bytes, topic ``benchmark_<i>`` as Go names them) with up to ``in_flight``
requests in flight, and reads the ``OK <offset> 1`` acknowledgements in a
second task.  Latency is the time from handing a request to the kernel to
reading its acknowledgement.

Read phase: every connection reads its topic back with pipelined ``READ``
requests of ``read_batches`` batches each, wrapping around at the end, until
the duration is over.  All frames of a bench topic have the same length, so
the offsets of the next requests are known without waiting for replies: the
reader sends ahead and only checks each reply's ``OK <offset> <n>`` line and
byte count (the frames are skipped with ``recv_into`` into one buffer).

``in_flight = 1`` is the pattern of real clients and of Go's ``log-cli
bench``: each connection sends one request and waits for its reply
(:mod:`logd_trio.tools.bench_lockstep`); a READ then asks for one batch unless
``read_batches`` says otherwise.

Cancellation: :func:`run_bench` may be cancelled at any await; connections
are closed and nothing is left running.
"""

from __future__ import annotations

import itertools
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, TextIO

import trio

from logd_trio.core.addresses import parse_address
from logd_trio.core.defaults import DEFAULT_ADDRESS
from logd_trio.core.errors import unwrap_group
from logd_trio.core.framing import build_body, build_frame, framed_size, valid_topic
from logd_trio.tools.bench_lockstep import read_lockstep, write_lockstep
from logd_trio.tools.bench_phases import (
    BenchError,
    TopicSpan,
    connect,
    read_messages,
    read_topic,
    repeat_until,
    topic_spans,
    write_frames,
)
from logd_trio.tools.bench_report import MIB, BenchResult, PhaseResult, format_result

__all__ = [
    "GO_MESSAGE",
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "PhaseResult",
    "format_result",
    "make_frame",
    "read_messages",
    "run_bench",
    "write_frames",
]

# The message Go's log-cli bench sends (31 bytes).
GO_MESSAGE: Final = b"oh hai sup not much idk howre u"
PROGRESS_INTERVAL: Final = 0.5


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run.  ``size`` is the whole BATCH request (line + body), as the server limits it."""

    host: str = DEFAULT_ADDRESS
    conns: int = 1
    topics: int = 1
    duration: float = 5.0
    size: int = 65500
    message_size: int = len(GO_MESSAGE)
    write: bool = True
    read: bool = True
    in_flight: int = 32  # requests in flight per connection (server default pipeline depth)
    read_batches: int = 0  # batches per READ request; 0: 16 when pipelined, 1 with one in flight
    topic_prefix: str = "benchmark_"
    ssl_context: ssl.SSLContext | None = None  # TLS on every connection (bench_tls.py)
    token: str | None = None  # sent with AUTH on every connection

    def __post_init__(self) -> None:
        parse_address(self.host)  # AddressError (a ValueError) names the problem
        for name in ("conns", "topics", "size", "message_size", "in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.read_batches < 0:
            raise ValueError(f"read_batches: must be at least 1 (or 0 for the default), got {self.read_batches}")
        if self.read_batches == 0:
            object.__setattr__(self, "read_batches", 1 if self.in_flight == 1 else 16)
        if not self.duration > 0:
            raise ValueError(f"duration: must be above 0, got {self.duration}")
        if not (self.write or self.read):
            raise ValueError("nothing to do: both the write and the read phase are off")
        if not valid_topic(self.topic(self.topics - 1).encode("ascii")):
            raise ValueError(f"topic_prefix: {self.topic_prefix!r} does not make valid topic names")

    def topic(self, i: int) -> str:
        return f"{self.topic_prefix}{i}"

    @property
    def address(self) -> tuple[str, int]:
        return parse_address(self.host)


def make_frame(topic: str, size: int, message_size: int) -> tuple[bytes, int]:
    """The largest request of ``message_size``-byte messages that fits ``size`` bytes; (frame, count).

    At least one message, even when that exceeds ``size``.  Messages are
    Go's bench text repeated (printable, no CR/LF).
    """
    msg = (GO_MESSAGE * (message_size // len(GO_MESSAGE) + 1))[:message_size]
    per = framed_size(message_size)
    count = max(1, (size - 64) // per)  # 64: room for the BATCH line
    frame = build_frame(topic, build_body(itertools.repeat(msg, count)), count)
    while len(frame) > size and count > 1:
        count -= 1
        frame = build_frame(topic, build_body(itertools.repeat(msg, count)), count)
    while True:  # grow while it still fits (the BATCH line's length is only known once built)
        bigger = build_frame(topic, build_body(itertools.repeat(msg, count + 1)), count + 1)
        if len(bigger) > size:
            return frame, count
        frame, count = bigger, count + 1


# ---------------------------------------------------------------- driver

_Job = Callable[[], Awaitable[None]]


async def _progress(phase: PhaseResult, started: float, out: TextIO) -> None:
    while True:
        await trio.sleep(PROGRESS_INTERVAL)
        dt = time.perf_counter() - started
        out.write(f"\r{phase.name}: {dt:5.1f}s  {phase.bytes / MIB / dt:9.1f} MiB/s  "
                  f"{phase.batches / dt:9.0f} batches/s  {phase.messages / dt:11.0f} messages/s ")
        out.flush()


async def _run_phase(
    config: BenchConfig,
    phase: PhaseResult,
    socks: list[trio.socket.SocketType],
    work: Callable[[int, trio.socket.SocketType], Iterable[_Job]],
    progress: TextIO | None,
) -> None:
    started = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            if progress is not None:
                nursery.start_soon(_progress, phase, started, progress)
            async with trio.open_nursery() as conns:
                for i, sock in enumerate(socks):
                    for job in work(i, sock):
                        conns.start_soon(job)
            phase.seconds = time.perf_counter() - started
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        raise unwrap_group(eg, skip=(trio.Cancelled,)) from None
    finally:
        if progress is not None:
            progress.write("\r\x1b[K")
            progress.flush()


async def run_bench(config: BenchConfig, *, progress: TextIO | None = None) -> BenchResult:
    """Run the write phase then the read phase (as configured); return the counters.

    ``progress``: a stream (stderr) that gets a live ``\\r`` progress line.
    Raises :class:`BenchError` or :class:`OSError` (cannot connect).
    """
    frames = {config.topic(t): make_frame(config.topic(t), config.size, config.message_size)
              for t in range(config.topics)}
    frame0, per_batch = frames[config.topic(0)]
    result = BenchResult(config, len(frame0), per_batch)
    spans = {name: TopicSpan() for name in frames}
    socks = [await connect(config.address, config.ssl_context, config.token) for _ in range(config.conns)]
    try:
        if config.write:
            phase = result.write = PhaseResult("write")
            deadline = trio.current_time() + config.duration

            def writers(i: int, sock: trio.socket.SocketType) -> Iterable[_Job]:
                name = config.topic(i % config.topics)
                frame, count = frames[name]
                span = spans[name]
                if config.in_flight == 1:
                    yield lambda: write_lockstep(sock, frame, count, deadline, phase, span.add)
                else:
                    yield lambda: write_frames(sock, repeat_until(frame, count, deadline), config.in_flight,
                                               phase, span.add)

            await _run_phase(config, phase, socks, writers, progress)
        if config.read:
            if not config.write:
                found = await topic_spans(config.address, config.ssl_context, config.token)
                for name in spans:
                    if name not in found or found[name].end <= found[name].start:
                        raise BenchError(f"topic {name} is missing or empty: run a write phase first")
                    spans[name] = found[name]
            phase = result.read = PhaseResult("read")
            deadline = trio.current_time() + config.duration

            def readers(i: int, sock: trio.socket.SocketType) -> Iterable[_Job]:
                name = config.topic(i % config.topics)
                frame, count = frames[name]
                if spans[name].start < 0:
                    return
                if config.in_flight == 1:
                    yield lambda: read_lockstep(sock, name, spans[name], len(frame), count, config.read_batches,
                                                deadline, phase)
                else:
                    yield lambda: read_topic(sock, name, spans[name], len(frame), count, config.in_flight,
                                             config.read_batches, deadline, phase)

            await _run_phase(config, phase, socks, readers, progress)
    finally:
        for s in socks:
            s.close()
    return result


def progress_stream(force: bool) -> TextIO | None:
    """stderr when it is a terminal (or ``force``), else None."""
    return sys.stderr if force or sys.stderr.isatty() else None
