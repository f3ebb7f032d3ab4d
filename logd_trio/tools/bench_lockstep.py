"""One request in flight per connection (``logd bench --in-flight 1``), as Go's ``log-cli bench`` runs.

Each connection sends one request and waits for its whole reply before the
next: a BATCH waits for its ``OK <offset> 1``, a READ of ``read_batches``
batches for its ``OK <offset> <n>`` line and the frames.  One task per
connection, no semaphore or event between sender and receiver, so the client
adds as little as it can to the round trip it measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from logd_trio.tools.bench_phases import RECV_BUFFER, BenchError, Lines, TopicSpan, send_all
from logd_trio.tools.bench_report import PhaseResult

__all__ = ["read_lockstep", "write_lockstep"]


async def write_lockstep(
    sock: trio.socket.SocketType, frame: bytes, count: int, deadline: float, phase: PhaseResult,
    on_ack: Callable[[int, int], None] | None = None,
) -> None:
    """Send ``frame`` and wait for its acknowledgement, over and over until ``deadline``."""
    buf = bytearray(4096)
    view = memoryview(buf)
    lines = Lines()
    clock = time.perf_counter
    latencies = phase.latencies
    length = len(frame)
    while trio.current_time() < deadline:
        t0 = clock()
        await send_all(sock, frame)
        line = None
        while line is None:
            n = await sock.recv_into(view)
            if n == 0:
                raise BenchError("server closed the connection")
            line, pos = lines.take(buf, 0, n)
            if line is not None and pos != n:
                raise BenchError(f"reply after the acknowledgement of a lone BATCH: {bytes(buf[pos:n])[:80]!r}")
        latencies.append(clock() - t0)
        if not line.startswith(b"OK "):
            raise BenchError(f"unexpected reply to BATCH: {line[:200]!r}")
        phase.batches += 1
        phase.requests += 1
        phase.messages += count
        phase.bytes += length
        if on_ack is not None:
            on_ack(int(line.split(b" ", 2)[1]), length)


async def read_lockstep(
    sock: trio.socket.SocketType, topic: str, span: TopicSpan, frame_len: int, per_batch: int,
    read_batches: int, deadline: float, phase: PhaseResult,
) -> None:
    """Read ``span`` of ``topic`` with one READ of ``read_batches`` batches at a time until ``deadline``."""
    total = (span.end - span.start) // frame_len
    if total <= 0 or (span.end - span.start) % frame_len:
        raise BenchError(f"topic {topic}: [{span.start}, {span.end}) is not a run of {frame_len}-byte frames; "
                         "read topics written by `logd bench` with the same --size and --message-size")
    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    lines = Lines()
    clock = time.perf_counter
    tname = topic.encode("ascii")
    j = 0
    while trio.current_time() < deadline:
        nb = min(read_batches, total - j)
        off = span.start + j * frame_len
        t0 = clock()
        await send_all(sock, b"READ %s %d %d\r\n" % (tname, off, nb * per_batch))
        line = None
        skip = -1  # frame bytes still to come, once the reply line is in
        while skip:
            n = await sock.recv_into(view)
            if n == 0:
                raise BenchError("server closed the connection")
            pos = 0
            if line is None:
                line, pos = lines.take(buf, 0, n)
                if line is None:
                    continue
                if line != b"OK %d %d" % (off, nb):
                    raise BenchError(f"READ {topic} {off} {nb * per_batch}: expected OK {off} {nb}, "
                                     f"got {line[:200]!r}")
                skip = nb * frame_len
            take = n - pos
            if take > skip:
                raise BenchError(f"READ {topic} {off}: {take - skip} bytes after the reply")
            skip -= take
            phase.bytes += take
        phase.latencies.append(clock() - t0)
        phase.requests += 1
        phase.batches += nb
        phase.messages += nb * per_batch
        j = (j + nb) % total
