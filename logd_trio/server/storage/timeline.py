"""Time on a topic's batches: where ``SEEK`` lands, and which partitions retention by age drops.

Synchronous, no trio, pure over the partitions (the owning thread's).  Every
batch has an append time (Unix ms): a v2 index holds it per batch; a batch the
index does not know the time of (a v1 index, a Go data directory, a rebuilt or
rescanned index) counts as appended at an upper bound of its true time (the
``.log``'s modification time, or the time of the next known batch), so a
search never skips a batch appended at or after the time asked for: it may
only start a little early.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from logd_trio.server.storage.index import IndexDamaged
from logd_trio.server.storage.partition import Partition

__all__ = ["CLOCK_AHEAD_WARN_MS", "droppable", "newest", "seek", "start_time"]

# A topic whose newest batch is this much later than the clock at open gets a warning.
CLOCK_AHEAD_WARN_MS = 60_000


def seek(parts: Sequence[Partition], when_ms: int, stop: int) -> int:
    """Offset of the first batch before ``stop`` appended at or after ``when_ms``; ``stop`` if none.

    A partition whose times are unknown (v1 index) answers its start when its
    newest batch (its ``.log``'s mtime) is not older than ``when_ms``; so does
    one whose index file lost records under the server (the next read of it
    rebuilds it).  Raises OSError.
    """
    for p in parts:
        if p.start >= stop:
            break
        if p.size == 0 or p.newest < when_ms:
            continue
        try:
            k = p.idx.first_at_or_after(when_ms)
            return min(p.start + p.idx.entry(k - 1)[0], stop)
        except IndexDamaged:
            return min(p.start, stop)  # early, never late
    return stop


def droppable(parts: Sequence[Partition], now_ms: int, max_age_ms: int, acked: int) -> tuple[int, int | None]:
    """``(n, due)``: retention by age may drop the ``n`` oldest partitions (sealed, never the head;
    every batch acknowledged; the newest batch older than ``now_ms - max_age_ms``), and the next
    one left is due in ``due`` ms (None: only the head is left; 1 when it waits for an ack)."""
    cutoff = now_ms - max_age_ms
    n = 0
    while n < len(parts) - 1 and parts[n].newest < cutoff and parts[n].end <= acked:
        n += 1
    if n >= len(parts) - 1:
        return n, None
    return n, max(parts[n].newest - cutoff + 1, 1)


def newest(parts: Sequence[Partition]) -> int:
    """Unix ms of the topic's last append (0: no batch)."""
    for p in reversed(parts):
        if p.size:
            return p.newest
    return 0


def start_time(parts: Sequence[Partition], now_ms: int, topic: str, log: logging.Logger) -> int:
    """The time of a just-opened topic's first batches: ``now_ms``, or its newest batch's time if
    later (times never decrease); far later (the clock went back) gets a warning."""
    last = newest(parts)
    if last > now_ms + CLOCK_AHEAD_WARN_MS:
        log.warning("topic %s: its newest batch was appended %d s after the clock's now (the clock went back?); "
                    "new batches get that time until the clock catches up", topic, (last - now_ms) // 1000)
    return max(now_ms, last)
