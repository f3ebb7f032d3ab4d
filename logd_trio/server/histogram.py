"""Cheap histograms for the hot path; ``/metrics`` turns them into Prometheus histograms.

An observation is one ``bisect`` and two additions on the Trio thread: no
lock, no label lookup, no object created.  Buckets are not cumulative here;
:meth:`Histogram.cumulative` makes them so at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

__all__ = ["COUNT_BOUNDS", "LATENCY_BOUNDS", "Histogram", "Histograms"]

# Seconds: 50 µs (a page-cache append) to 10 s (a disk in trouble).
LATENCY_BOUNDS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                         0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Batches made durable by one fsync (group commit).
COUNT_BOUNDS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0)


class Histogram:
    """Counts per bucket (upper bounds inclusive, as Prometheus' ``le``) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be distinct and increasing")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> Histogram:
        """A frozen copy, to format away from the Trio thread while this one goes on counting."""
        h = Histogram.__new__(Histogram)
        h.bounds, h.counts, h.sum = self.bounds, list(self.counts), self.sum
        return h

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, observations <= le)`` for every bound, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Histograms:
    """The server's latency and group-commit histograms (one set per server)."""

    __slots__ = ("batch_latency", "batches_per_fsync", "fsync_latency", "read_latency")

    def __init__(self) -> None:
        self.batch_latency = Histogram(LATENCY_BOUNDS)
        self.read_latency = Histogram(LATENCY_BOUNDS)
        self.fsync_latency = Histogram(LATENCY_BOUNDS)
        self.batches_per_fsync = Histogram(COUNT_BOUNDS)
