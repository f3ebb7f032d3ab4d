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

from collections.abc import Sequence

from logd_trio.server.storage.partition import Partition

__all__ = ["droppable", "newest", "seek"]


def seek(parts: Sequence[Partition], when_ms: int, stop: int) -> int:
    """Offset of the first batch before ``stop`` appended at or after ``when_ms``; ``stop`` if none.

    A partition whose times are unknown (v1 index) answers its start when its
    newest batch (its ``.log``'s mtime) is not older than ``when_ms``.
    Raises :class:`~logd_trio.server.storage.index.IndexDamaged` or OSError
    if an index file lost records under the server.
    """
    for p in parts:
        if p.start >= stop:
            break
        if p.size == 0 or p.newest < when_ms:
            continue
        k = p.idx.first_at_or_after(when_ms)
        return min(p.start + p.idx.entry(k - 1)[0], stop)
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
