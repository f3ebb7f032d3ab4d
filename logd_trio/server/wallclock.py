"""The wall clock the server stamps batches with (Unix milliseconds), and its test seam.

Batch times (docs/storage.md), retention by age and SEEK read :func:`now_ms`.
Production reads the system clock; a test installs a source that maps Trio's
(virtual) clock to wall time (:func:`trio_mapped`), so that retention by age and
SEEK are tested in virtual time: a ``trio.sleep`` of a week then moves the
batches' clock a week too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import trio

__all__ = ["installed", "now_ms", "trio_mapped"]

_source: Callable[[], int] | None = None


def now_ms() -> int:
    """Unix time in milliseconds (from the installed source, if any)."""
    source = _source
    return time.time_ns() // 1_000_000 if source is None else source()


def trio_mapped(start_ms: int | None = None) -> Callable[[], int]:
    """A source reading Trio's current clock (call it inside ``trio.run``): ``start_ms`` (default:
    the wall clock now) at the moment it is made, advancing with ``trio.current_time()``."""
    base_ms = time.time_ns() // 1_000_000 if start_ms is None else start_ms
    t0 = trio.current_time()

    def source() -> int:
        return base_ms + int((trio.current_time() - t0) * 1000)

    return source


@contextlib.contextmanager
def installed(source: Callable[[], int]) -> Iterator[Callable[[], int]]:
    """Use ``source`` as the wall clock inside the block (tests)."""
    global _source
    previous, _source = _source, source
    try:
        yield source
    finally:
        _source = previous
