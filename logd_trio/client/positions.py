"""Where a scanner starts: the oldest message, the end (follow from now), the last N
messages, or an exact ``OFFSET:DELTA`` (as ``logd read -n`` prints it).

The protocol reads forwards only, from batch starts.  The end is the head the
TOPICS extension reports (on Go logd: found by reading through once); the last
N messages are found by reading the retained log once and keeping the
positions of the last N (bodies are not kept).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

from logd_trio.client.checkpoint import Position
from logd_trio.core.errors import NotFound
from logd_trio.core.replies import ErrorReply, ReadReply

__all__ = ["END", "OLDEST", "Last", "StartAt", "find_end", "find_last", "parse_start"]

OLDEST: Final = "oldest"
END: Final = "end"


@dataclass(frozen=True, slots=True)
class Last:
    """Start at the last ``n`` messages of the topic (all of them if it has fewer)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("Last(n): n must be >= 0")


StartAt = Position | Last | Literal["oldest", "end"]


def parse_start(text: str) -> StartAt:
    """``oldest``, ``end``, ``-N`` (the last N messages), ``OFFSET`` or ``OFFSET:DELTA``."""
    t = text.strip().lower()
    if t in (OLDEST, "beginning"):
        return OLDEST
    if t == END:
        return END
    if t.startswith("-") and t[1:].isdigit():
        return Last(int(t[1:]))
    offset, sep, delta = t.partition(":")
    if offset.isdigit() and (not sep or delta.isdigit()):
        return Position(int(offset), int(delta) if sep else 0)
    raise ValueError(f"{text!r} is not a position: use oldest, end, -N, OFFSET or OFFSET:DELTA")


# One READ of the scanner's size from an offset (or TAIL, from the oldest, for None).
Fetch = Callable[[int | None], Awaitable[ReadReply | ErrorReply]]


async def _walk(fetch: Fetch, on_reply: Callable[[ReadReply], None]) -> int | None:
    """Read the topic from its oldest batch to its head; returns the head (None: no batch)."""
    offset: int | None = None
    while True:
        reply = await fetch(offset)
        if isinstance(reply, ErrorReply):
            exc = reply.exception()
            if not isinstance(exc, NotFound):
                raise exc
            return offset
        on_reply(reply)
        offset = reply.next_offset


async def find_end(fetch: Fetch) -> Position | None:
    """The head of the topic by reading through it (servers without TOPICS); None: empty."""
    head = await _walk(fetch, lambda r: None)
    return None if head is None else Position(head, 0)


async def find_last(fetch: Fetch, n: int) -> Position | None:
    """Where the last ``n`` messages start; the head when ``n`` is 0; None for an empty topic."""
    starts: deque[tuple[int, int]] = deque(maxlen=max(n, 1))

    def keep(reply: ReadReply) -> None:
        for batch in reply.batches:
            for delta, _ in batch.messages():
                starts.append((batch.offset, delta))

    head = await _walk(fetch, keep)
    if head is None:
        return None
    if n == 0 or not starts:
        return Position(head, 0)
    return Position(*starts[0])
