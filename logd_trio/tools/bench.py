"""The engine of ``logd bench``: pipelined raw BATCH / READ load over trio sockets.

Client side, like Go's ``log-cli bench``: it uses only the pure core
(:mod:`logd_trio.core.framing`) and trio sockets, never the client library, so what
it measures is the server plus the kernel.

Write phase: every connection sends the same pre-built request over and over
(``--size`` bytes including the ``BATCH`` line, messages of ``--message-size``
bytes, topic ``benchmark_<i>`` as Go names them) with up to ``window``
requests in flight, and reads the ``OK <offset> 1`` acknowledgements in a
second task.  Latency is the time from handing a request to the kernel to
reading its acknowledgement.

Read phase: every connection reads its topic back with pipelined ``READ``
requests of ``read_batches`` batches each, wrapping around at the end, until
the duration is over.  All frames of a bench topic have the same length, so
the offsets of the next requests are known without waiting for replies: the
reader sends ahead and only checks each reply's ``OK <offset> <n>`` line and
byte count (the frames are skipped with ``recv_into`` into one buffer).

Cancellation: :func:`run_bench` may be cancelled at any await; connections
are closed and nothing is left running.
"""

from __future__ import annotations

import collections
import itertools
import math
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, TextIO

import trio

from logd_trio.core.framing import build_body, build_frame, valid_topic

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
RECV_BUFFER: Final = 1 << 20
PROGRESS_INTERVAL: Final = 0.5
_MIB: Final = 1024 * 1024


class BenchError(Exception):
    """The server refused a request, answered unexpectedly, or went away."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run.  ``size`` is the whole BATCH request (line + body), as the server limits it."""

    host: str = "127.0.0.1:1774"
    conns: int = 1
    topics: int = 1
    duration: float = 5.0
    size: int = 65500
    message_size: int = len(GO_MESSAGE)
    write: bool = True
    read: bool = True
    window: int = 32  # requests in flight per connection (server default pipeline depth)
    read_batches: int = 16  # batches per READ request
    topic_prefix: str = "benchmark_"

    def __post_init__(self) -> None:
        for name in ("conns", "topics", "size", "message_size", "window", "read_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
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
        host, _, port = self.host.rpartition(":")
        return (host.strip("[]") or "127.0.0.1", int(port))


def make_frame(topic: str, size: int, message_size: int) -> tuple[bytes, int]:
    """The largest request of ``message_size``-byte messages that fits ``size`` bytes; (frame, count).

    At least one message, even when that exceeds ``size``.  Messages are
    Go's bench text repeated (printable, no CR/LF).
    """
    msg = (GO_MESSAGE * (message_size // len(GO_MESSAGE) + 1))[:message_size]
    per = len(b"MSG %d\r\n" % message_size) + message_size + 2
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


# ---------------------------------------------------------------- results


@dataclass(slots=True)
class PhaseResult:
    """Counters of one phase; latencies in seconds, one per request."""

    name: str
    seconds: float = 0.0
    bytes: int = 0
    batches: int = 0
    messages: int = 0
    requests: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def mib_per_s(self) -> float:
        return self.bytes / _MIB / self.seconds if self.seconds else 0.0

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds if self.seconds else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def percentiles(self) -> dict[str, float]:
        """min/p50/p90/p99/max latency in seconds (nearest rank); empty when nothing was measured."""
        lat = sorted(self.latencies)
        if not lat:
            return {}
        n = len(lat)

        def rank(q: float) -> float:
            return lat[min(n - 1, max(0, math.ceil(q * n) - 1))]

        return {"min": lat[0], "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": lat[-1]}

    def as_dict(self) -> dict[str, object]:
        return {
            "seconds": self.seconds, "bytes": self.bytes, "batches": self.batches,
            "messages": self.messages, "requests": self.requests, "mib_per_s": self.mib_per_s,
            "batches_per_s": self.batches_per_s, "messages_per_s": self.messages_per_s,
            "latency_s": self.percentiles(),
        }


@dataclass(slots=True)
class BenchResult:
    config: BenchConfig
    frame_size: int
    messages_per_batch: int
    write: PhaseResult | None = None
    read: PhaseResult | None = None

    def as_dict(self) -> dict[str, object]:
        c = self.config
        out: dict[str, object] = {
            "host": c.host, "conns": c.conns, "topics": c.topics, "duration": c.duration,
            "size": c.size, "message_size": c.message_size, "frame_size": self.frame_size,
            "messages_per_batch": self.messages_per_batch,
        }
        if self.write is not None:
            out["write"] = self.write.as_dict()
        if self.read is not None:
            out["read"] = self.read.as_dict()
        return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}ms"


def format_result(result: BenchResult) -> str:
    """The human report, as printed by ``logd bench``."""
    c = result.config
    lines = [
        f"host {c.host}, {c.conns} conns, {c.topics} topics, {c.duration:g}s per phase, "
        f"batch {result.frame_size} B = {result.messages_per_batch} messages of {c.message_size} B"
    ]
    for phase in (result.write, result.read):
        if phase is None:
            continue
        lines.append(
            f"{phase.name:5}  {phase.bytes / _MIB:10.1f} MiB in {phase.seconds:.2f}s  "
            f"{phase.mib_per_s:9.1f} MiB/s  {phase.batches_per_s:10.0f} batches/s  "
            f"{phase.messages_per_s:12.0f} messages/s"
        )
        p = phase.percentiles()
        if p:
            what = "ack" if phase.name == "write" else "reply"
            lines.append(f"       {what} latency  " + "  ".join(f"{k} {_ms(v)}" for k, v in p.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- sockets


async def _connect(config: BenchConfig) -> trio.socket.SocketType:
    host, port = config.address
    stream = await trio.open_tcp_stream(host, port)  # sets TCP_NODELAY
    return stream.socket


async def _send_all(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


class _Lines:
    """Reply-line assembly over a shared receive buffer (a line may span two receives)."""

    __slots__ = ("carry",)

    def __init__(self) -> None:
        self.carry = b""

    def take(self, buf: bytearray, pos: int, end: int) -> tuple[bytes | None, int]:
        """The next complete line (without CRLF) from ``buf[pos:end]`` and the new position."""
        nl = buf.find(b"\n", pos, end)
        if nl < 0:
            self.carry += buf[pos:end]
            if len(self.carry) > 4096:
                raise BenchError(f"reply line too long: {self.carry[:80]!r}")
            return None, end
        line = self.carry + buf[pos:nl] if self.carry else bytes(buf[pos:nl])
        self.carry = b""
        return line.rstrip(b"\r"), nl + 1


# ---------------------------------------------------------------- write phase


@dataclass(slots=True)
class _TopicSpan:
    """What the write phase stored in one topic: [start, end) of identical frames."""

    start: int = -1
    end: int = -1

    def add(self, offset: int, length: int) -> None:
        if self.start < 0 or offset < self.start:
            self.start = offset
        if offset + length > self.end:
            self.end = offset + length


async def write_frames(
    sock: trio.socket.SocketType,
    frames: Iterable[tuple[bytes | memoryview, int]],
    window: int,
    phase: PhaseResult,
    on_ack: Callable[[int, int], None] | None = None,
) -> None:
    """Send ``(frame, count)`` requests pipelined, ``window`` in flight, until ``frames`` ends.

    Counts every acknowledged batch into ``phase`` and calls ``on_ack(offset,
    frame_len)``.  Returns once every sent batch is acknowledged.  Raises
    :class:`BenchError` on an ``ERR`` reply or a closed connection.
    """
    sent: collections.deque[tuple[float, int, int]] = collections.deque()
    room = trio.Semaphore(window)
    finished = False
    wakeup = trio.Event()
    clock = time.perf_counter

    async def sender() -> None:
        nonlocal finished
        try:
            for frame, count in frames:
                await room.acquire()
                sent.append((clock(), len(frame), count))
                await _send_all(sock, frame)
                if len(sent) == 1:
                    wakeup.set()
        finally:
            finished = True
            wakeup.set()

    async def receiver() -> None:
        nonlocal wakeup
        buf = bytearray(65536)
        view = memoryview(buf)
        lines = _Lines()
        latencies = phase.latencies
        while True:
            if not sent:
                if finished:
                    return
                await wakeup.wait()
                wakeup = trio.Event()
                continue
            n = await sock.recv_into(view)
            if n == 0:
                raise BenchError("server closed the connection")
            pos = 0
            now = clock()
            while pos < n:
                line, pos = lines.take(buf, pos, n)
                if line is None:
                    break
                if not line.startswith(b"OK ") or not sent:
                    raise BenchError(f"unexpected reply to BATCH: {line[:200]!r}")
                t0, length, count = sent.popleft()
                latencies.append(now - t0)
                phase.batches += 1
                phase.requests += 1
                phase.messages += count
                phase.bytes += length
                if on_ack is not None:
                    on_ack(int(line.split(b" ", 2)[1]), length)
                room.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        nursery.start_soon(sender)


def _repeat_until(frame: bytes, count: int, deadline: float) -> Iterator[tuple[bytes, int]]:
    clock = trio.current_time
    while clock() < deadline:
        yield frame, count


# ---------------------------------------------------------------- read phase


async def _read_topic(
    sock: trio.socket.SocketType,
    topic: str,
    span: _TopicSpan,
    frame_len: int,
    per_batch: int,
    config: BenchConfig,
    deadline: float,
    phase: PhaseResult,
) -> None:
    """Read ``span`` of ``topic`` over and over with pipelined READs until ``deadline``."""
    total = (span.end - span.start) // frame_len
    if total <= 0 or (span.end - span.start) % frame_len:
        raise BenchError(f"topic {topic}: [{span.start}, {span.end}) is not a run of {frame_len}-byte frames; "
                         "read topics written by `logd bench` with the same --size and --message-size")
    k = config.read_batches
    sent: collections.deque[tuple[float, int, int]] = collections.deque()  # (t0, offset, nbatches)
    room = trio.Semaphore(config.window)
    finished = False
    wakeup = trio.Event()
    clock = time.perf_counter
    tname = topic.encode("ascii")

    async def sender() -> None:
        nonlocal finished
        j = 0
        try:
            while trio.current_time() < deadline:
                nb = min(k, total - j)
                await room.acquire()
                off = span.start + j * frame_len
                sent.append((clock(), off, nb))
                await _send_all(sock, b"READ %s %d %d\r\n" % (tname, off, nb * per_batch))
                if len(sent) == 1:
                    wakeup.set()
                j = (j + nb) % total
        finally:
            finished = True
            wakeup.set()

    async def receiver() -> None:
        nonlocal wakeup
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        lines = _Lines()
        latencies = phase.latencies
        skip = 0  # frame bytes of the current reply still to come
        while True:
            if not sent and not skip:
                if finished:
                    return
                await wakeup.wait()
                wakeup = trio.Event()
                continue
            n = await sock.recv_into(view)
            if n == 0:
                raise BenchError("server closed the connection")
            pos = 0
            while pos < n:
                if skip:
                    take = min(skip, n - pos)
                    skip -= take
                    pos += take
                    phase.bytes += take
                    if not skip:
                        t0, _, nb = sent.popleft()
                        latencies.append(clock() - t0)
                        phase.requests += 1
                        phase.batches += nb
                        phase.messages += nb * per_batch
                        room.release()
                    continue
                line, pos = lines.take(buf, pos, n)
                if line is None:
                    break
                if not sent:
                    raise BenchError(f"unexpected reply to READ: {line[:200]!r}")
                _, off, nb = sent[0]
                if line != b"OK %d %d" % (off, nb):
                    raise BenchError(f"READ {topic} {off} {nb * per_batch}: expected OK {off} {nb}, "
                                     f"got {line[:200]!r}")
                skip = nb * frame_len

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        nursery.start_soon(sender)


async def read_messages(
    sock: trio.socket.SocketType, topic: str, offset: int, messages: int, phase: PhaseResult,
    limit: int = 50000,
) -> int:
    """Read ``messages`` messages (or up to the head) of any topic from ``offset``; return the next offset.

    One READ in flight at a time, each for up to ``limit`` messages (the
    replies are large, so the round trip is a small share); the frames are
    walked by their ``BATCH`` lines only and their bodies skipped, as a
    consumer writing to /dev/null would.
    """
    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    lines = _Lines()
    tname = topic.encode("ascii")
    clock = time.perf_counter
    n = pos = 0
    while phase.messages < messages:
        t0 = clock()
        await _send_all(sock, b"READ %s %d %d\r\n" % (tname, offset, min(limit, messages - phase.messages)))
        reply: bytes | None = None
        frames = -1  # frames of this reply still to come
        skip = 0
        while frames:
            if pos == n:
                n = await sock.recv_into(view)
                pos = 0
                if n == 0:
                    raise BenchError("server closed the connection")
            if skip:
                take = min(skip, n - pos)
                skip -= take
                pos += take
                phase.bytes += take
                if not skip:
                    frames -= 1
                continue
            line, pos = lines.take(buf, pos, n)
            if line is None:
                continue
            phase.bytes += len(line) + 2
            if reply is None:
                reply = line
                if line == b"ERR not found":
                    return offset
                words = line.split(b" ")
                if len(words) != 3 or words[0] != b"OK" or int(words[1]) != offset:
                    raise BenchError(f"READ {topic} {offset}: unexpected reply {line[:200]!r}")
                frames = int(words[2])
                continue
            words = line.split(b" ")
            if len(words) != 5 or words[0] != b"BATCH":
                raise BenchError(f"READ {topic}: not a batch frame: {line[:200]!r}")
            skip = int(words[1])
            offset += len(line) + 2 + skip
            phase.batches += 1
            phase.messages += int(words[4])
        phase.requests += 1
        phase.latencies.append(clock() - t0)
    return offset


async def _topic_spans(config: BenchConfig) -> dict[str, _TopicSpan]:
    """``--only-read``: the retained range of each bench topic, from the TOPICS extension."""
    sock = await _connect(config)
    with sock:
        await _send_all(sock, b"TOPICS\r\n")
        data = b""
        while True:
            chunk = await sock.recv(65536)
            if not chunk:
                raise BenchError("server closed the connection")
            data += chunk
            head, sep, rest = data.partition(b"\r\n")
            if sep and not head.startswith(b"MOK "):
                raise BenchError(f"TOPICS: unexpected reply {head[:200]!r}")
            if sep and len(rest) >= int(head[4:]) + 2:
                body = rest[: int(head[4:])]
                break
    spans: dict[str, _TopicSpan] = {}
    for line in body.split(b"\r\n"):
        name, _, rng = line.partition(b": ")
        words = rng.split()
        if len(words) == 2:
            spans[name.decode("ascii")] = _TopicSpan(int(words[0]), int(words[1]))
    return spans


# ---------------------------------------------------------------- driver

_Job = Callable[[], Awaitable[None]]


async def _progress(phase: PhaseResult, started: float, out: TextIO) -> None:
    while True:
        await trio.sleep(PROGRESS_INTERVAL)
        dt = time.perf_counter() - started
        out.write(f"\r{phase.name}: {dt:5.1f}s  {phase.bytes / _MIB / dt:9.1f} MiB/s  "
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
        raise _first(eg) from None
    finally:
        if progress is not None:
            progress.write("\r\x1b[K")
            progress.flush()


def _first(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first(e)
        return e
    return eg


async def run_bench(config: BenchConfig, *, progress: TextIO | None = None) -> BenchResult:
    """Run the write phase then the read phase (as configured); return the counters.

    ``progress``: a stream (stderr) that gets a live ``\\r`` progress line.
    Raises :class:`BenchError` or :class:`OSError` (cannot connect).
    """
    frames = {config.topic(t): make_frame(config.topic(t), config.size, config.message_size)
              for t in range(config.topics)}
    frame0, per_batch = frames[config.topic(0)]
    result = BenchResult(config, len(frame0), per_batch)
    spans = {name: _TopicSpan() for name in frames}
    socks = [await _connect(config) for _ in range(config.conns)]
    try:
        if config.write:
            phase = result.write = PhaseResult("write")
            deadline = trio.current_time() + config.duration

            def writers(i: int, sock: trio.socket.SocketType) -> Iterable[_Job]:
                name = config.topic(i % config.topics)
                frame, count = frames[name]
                span = spans[name]
                yield lambda: write_frames(sock, _repeat_until(frame, count, deadline), config.window, phase,
                                           span.add)

            await _run_phase(config, phase, socks, writers, progress)
        if config.read:
            if not config.write:
                found = await _topic_spans(config)
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
                yield lambda: _read_topic(sock, name, spans[name], len(frame), count, config, deadline, phase)

            await _run_phase(config, phase, socks, readers, progress)
    finally:
        for s in socks:
            s.close()
    return result


def progress_stream(force: bool) -> TextIO | None:
    """stderr when it is a terminal (or ``force``), else None."""
    return sys.stderr if force or sys.stderr.isatty() else None
