"""What a connection hands a topic task: one batch on its way, and where a replicated one must land."""

from __future__ import annotations

import time

import trio

from logd_trio.core.errors import LogdError

__all__ = ["Append", "Place"]

# A replicated frame's placement: (offset it must land at, the leader starts a partition there,
# the leader's first offset).  Carried by the item itself, so a frame refused before it reaches
# the log cannot hand its offset to the next one.
Place = tuple[int, bool, int]


class Append:
    """One BATCH on its way to the topic, and the slot its answer comes back in."""

    __slots__ = ("count", "done", "end", "error", "frame", "offset", "place", "queued")

    def __init__(self, frame: bytes, count: int, place: Place | None = None) -> None:
        self.frame = frame
        self.count = count
        self.place = place  # a replicated frame: where it must land (see Place)
        self.offset = -1
        self.end = -1  # the offset after the batch, once stored
        self.error: LogdError | None = None
        self.done = trio.Event()
        self.queued = time.perf_counter()


