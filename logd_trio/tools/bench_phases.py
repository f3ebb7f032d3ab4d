"""The load of ``logd bench``: raw pipelined BATCH and READ requests over trio sockets.

Every function here speaks the wire protocol directly (no client library), so
what is measured is the server plus the kernel.
"""

from __future__ import annotations

import collections
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import trio

from logd_trio.core.defaults import DEFAULT_MAX_MESSAGES
from logd_trio.core.errors import LogdError
from logd_trio.tools.bench_report import PhaseResult
from logd_trio.tools.bench_tls import open_connection

__all__ = [
    "RECV_BUFFER", "BenchError", "Lines", "TopicSpan", "read_messages", "read_topic", "send_all", "topic_spans",
    "write_frames",
]

RECV_BUFFER: Final = 1 << 20


class BenchError(LogdError):
    """The server refused a request, answered unexpectedly, or went away."""


async def connect(address: tuple[str, int], ssl_context: ssl.SSLContext | None = None,
                  token: str | None = None) -> trio.socket.SocketType:
    return await open_connection(address, ssl_context, token)  # TLS and AUTH as asked (bench_tls.py)


async def send_all(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


class Lines:
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
class TopicSpan:
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
                await send_all(sock, frame)
                if len(sent) == 1:
                    wakeup.set()
        finally:
            finished = True
            wakeup.set()

    async def receiver() -> None:
        nonlocal wakeup
        buf = bytearray(65536)
        view = memoryview(buf)
        lines = Lines()
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


def repeat_until(frame: bytes, count: int, deadline: float) -> Iterator[tuple[bytes, int]]:
    clock = trio.current_time
    while clock() < deadline:
        yield frame, count


# ---------------------------------------------------------------- read phase


async def read_topic(
    sock: trio.socket.SocketType,
    topic: str,
    span: TopicSpan,
    frame_len: int,
    per_batch: int,
    window: int,
    read_batches: int,
    deadline: float,
    phase: PhaseResult,
) -> None:
    """Read ``span`` of ``topic`` over and over with pipelined READs until ``deadline``."""
    total = (span.end - span.start) // frame_len
    if total <= 0 or (span.end - span.start) % frame_len:
        raise BenchError(f"topic {topic}: [{span.start}, {span.end}) is not a run of {frame_len}-byte frames; "
                         "read topics written by `logd bench` with the same --size and --message-size")
    k = read_batches
    sent: collections.deque[tuple[float, int, int]] = collections.deque()  # (t0, offset, nbatches)
    room = trio.Semaphore(window)
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
                await send_all(sock, b"READ %s %d %d\r\n" % (tname, off, nb * per_batch))
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
        lines = Lines()
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
    limit: int = DEFAULT_MAX_MESSAGES,
) -> int:
    """Read ``messages`` messages (or up to the head) of any topic from ``offset``; return the next offset.

    One READ in flight at a time, each for up to ``limit`` messages (the
    replies are large, so the round trip is a small share); the frames are
    walked by their ``BATCH`` lines only and their bodies skipped, as a
    consumer writing to /dev/null would.
    """
    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    lines = Lines()
    tname = topic.encode("ascii")
    clock = time.perf_counter
    n = pos = 0
    while phase.messages < messages:
        t0 = clock()
        await send_all(sock, b"READ %s %d %d\r\n" % (tname, offset, min(limit, messages - phase.messages)))
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


async def topic_spans(address: tuple[str, int], ssl_context: ssl.SSLContext | None = None,
                      token: str | None = None) -> dict[str, TopicSpan]:
    """``--only-read``: the retained range of each bench topic, from the TOPICS extension."""
    sock = await connect(address, ssl_context, token)
    with sock:
        await send_all(sock, b"TOPICS\r\n")
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
    spans: dict[str, TopicSpan] = {}
    for line in body.split(b"\r\n"):
        name, _, rng = line.partition(b": ")
        words = rng.split()
        if len(words) == 2:
            spans[name.decode("ascii")] = TopicSpan(int(words[0]), int(words[1]))
    return spans


