"""What a writer queues: sealed :class:`WriteBatch` requests, the batch being built, receipts.

Pure bookkeeping, no I/O: :class:`BatchBuilder` frames messages into the batch
being built and seals it into one ``BATCH`` request (the one encoder,
:func:`logd_trio.core.framing.frame_head`) when the next message would not fit.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Generator
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import add
from typing import Any, Final

import anyio

from logd_trio.core.errors import LogdError, MessageTooLarge
from logd_trio.core.framing import frame_head, iter_messages, msg_header

__all__ = ["Ack", "BatchBuilder", "Receipt", "WriteBatch"]

CRLF: Final = b"\r\n"
# bytes of a MSG header beyond the message itself, at most ("MSG " + 20 digits + CRLF) + CRLF
MAX_MSG_OVERHEAD: Final = 28


_MSG_LINE: Final = b"MSG %d\r\n".__mod__


class _Heads:
    """The ``MSG <n>`` lines (CRLF included) of messages by length: looked up in a table (log
    lines come in few lengths) instead of formatted one by one.

    The table holds the line of every length below its size.  It only grows, up to
    ``bound``, and only by as many lines as messages were formatted since it last grew (a
    one-line write formats its one line): filling it costs at most ``bound`` formats in a
    process's life.  A call with a message at or past the bound formats its lines, as
    without the table (no clearing, no misses).  The table is replaced, never changed in
    place, so a caller in another thread keeps a consistent one."""

    __slots__ = ("bound", "credit", "table")

    def __init__(self, bound: int = 8192) -> None:
        self.bound = bound  # lengths kept: about 0.4 MB at most
        self.table: list[bytes] = []
        self.credit = 0  # messages formatted since the table last grew

    def lines(self, lengths: list[int], longest: int) -> list[bytes]:
        """The MSG lines for ``lengths`` (``longest`` is their maximum)."""
        table = self.table
        if longest >= len(table):
            grow = longest + 1 - len(table)
            if longest >= self.bound or grow > self.credit + len(lengths):
                self.credit += len(lengths)
                return list(map(_MSG_LINE, lengths))
            table = table + list(map(_MSG_LINE, range(len(table), longest + 1)))
            self.table, self.credit = table, 0
        return list(map(table.__getitem__, lengths))


_HEADS: Final = _Heads()


@dataclass(frozen=True, slots=True)
class Ack:
    """Where an acknowledged message is stored: its batch's offset and its delta in that batch."""

    offset: int
    delta: int


class Receipt:
    """The outcome of one message given to :meth:`Writer.send`: ``await receipt`` gives its
    :class:`Ack` once the server acknowledged its batch, or raises the batch's error."""

    __slots__ = ("_done", "delta", "error", "offset")

    def __init__(self, delta: int) -> None:
        self.delta = delta
        self.offset: int | None = None
        self.error: LogdError | None = None
        self._done = anyio.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _resolve(self, offset: int | None, error: LogdError | None) -> None:
        self.offset, self.error = offset, error
        self._done.set()

    async def wait(self) -> Ack:
        """Wait for the outcome: the :class:`Ack`, or the batch's error raised."""
        await self._done.wait()
        if self.error is not None:
            raise self.error
        assert self.offset is not None
        return Ack(self.offset, self.delta)

    def __await__(self) -> Generator[Any, None, Ack]:
        return self.wait().__await__()


class WriteBatch:
    """A sealed batch: the encoded ``BATCH`` request and, once it failed, its ``error``.

    The request is kept as its ``head`` (the ``BATCH`` line) and ``body`` and sent as two
    buffers (no copy of the body into one request); ``request`` joins them, ``size`` is its
    length."""

    __slots__ = ("attempts", "body", "count", "error", "head", "last_seq", "offset", "receipts", "resolved", "size",
                 "topic")

    def __init__(self, topic: str, head: bytes, body: bytes, count: int, last_seq: int) -> None:
        self.topic = topic
        self.head = head
        self.body = body
        self.size = len(head) + len(body)
        self.count = count
        self.last_seq = last_seq
        self.error: LogdError | None = None
        self.offset: int | None = None
        self.resolved = False
        self.receipts: list[Receipt] | None = None
        self.attempts = 0  # times sent

    @property
    def request(self) -> bytes:
        """The whole ``BATCH`` request (a copy: the head and the body joined)."""
        return self.head + self.body

    def messages(self) -> list[bytes]:
        """The messages of this batch, in order."""
        return [m for _, m in iter_messages(self.body)]

    def settle(self, error: LogdError | None, offset: int | None) -> None:
        """Record the outcome (an ``offset`` or an ``error``) and tell the receipts."""
        self.resolved = True
        self.error = error
        if error is None:
            self.offset = offset
        if self.receipts:
            for r in self.receipts:
                r._resolve(offset, error)

    def __repr__(self) -> str:
        return f"<WriteBatch {self.topic} count={self.count} size={self.size} error={self.error!r}>"


class BatchBuilder:
    """The batch being built for one topic, and the limits it is sealed at."""

    __slots__ = ("batch_size", "body_limit", "count", "parts", "receipts", "since", "size", "topic", "topic_raw")

    def __init__(self, topic: str, topic_raw: bytes) -> None:
        self.topic = topic
        self.topic_raw = topic_raw
        self.batch_size = 0
        self.body_limit = 0
        self.parts: list[bytes] = []
        self.size = 0  # body bytes so far
        self.count = 0
        self.since = 0.0  # when its first message came
        self.receipts: list[Receipt] | None = None

    def set_limit(self, batch_size: int) -> None:
        if batch_size < 64:
            raise ValueError(f"batch_size {batch_size} is too small")
        self.batch_size = batch_size
        # longest possible request line: BATCH <size> <topic> <crc> <count>\r\n
        digits = len(str(batch_size))
        self.body_limit = batch_size - (6 + digits + 1 + len(self.topic_raw) + 1 + 10 + 1 + digits + 2)

    def make(self, parts: list[bytes], count: int, last_seq: int) -> WriteBatch:
        body = b"".join(parts)
        return WriteBatch(self.topic, frame_head(self.topic_raw, body, count), body, count, last_seq)

    def seal(self, last_seq: int) -> WriteBatch:
        """The batch being built as a request; the builder starts empty again."""
        batch = self.make(self.parts, self.count, last_seq)
        batch.receipts, self.receipts = self.receipts, None
        self.parts = []
        self.size = 0
        self.count = 0
        return batch

    def add_many(self, msgs: list[bytes], seq: int, now: float) -> tuple[list[WriteBatch], int]:
        """Frame ``msgs`` (the messages after number ``seq``) into the batch being built,
        sealing each batch that fills up, in order.  Returns the sealed batches and how many
        bytes this adds to the queue (framing and request lines included).  All or nothing:
        :class:`MessageTooLarge` is raised before anything changes.

        The work is per batch, not per message: lengths, ``MSG`` headers and batch ends
        are computed by C-level ``map``/``accumulate``, each batch is cut with a bisection.
        """
        if not msgs:
            return [], 0
        lengths = list(map(len, msgs))
        limit = self.body_limit
        longest = max(lengths)
        if longest + MAX_MSG_OVERHEAD > limit:
            return self._add_many_big(msgs, seq, now)
        n = len(msgs)
        heads = _HEADS.lines(lengths, longest)
        # ends[k]: where message k's framing ends, counted from the first new message
        ends = list(accumulate(map(add, map(len, heads), map(add, lengths, repeat(2)))))
        parts = [CRLF] * (3 * n)
        parts[0::3] = heads
        parts[1::3] = msgs
        sealed: list[WriteBatch] = []
        queued = ends[-1]
        carried, size, count, receipts = self.parts, self.size, self.count, self.receipts
        i = base = 0
        while (j := bisect_right(ends, base + limit - size, i)) < n:  # messages i..j-1 fit, j does not
            assert j > i or count, "a message that fits alone fits an empty batch"
            body = parts[3 * i : 3 * j]
            batch = self.make(carried + body if carried else body, count + j - i, seq + j)
            batch.receipts, receipts = receipts, None
            if j > i:
                size += ends[j - 1] - base
                base = ends[j - 1]
            queued += batch.size - size
            sealed.append(batch)
            carried, size, count, i = [], 0, 0, j
        rest = parts[3 * i :]
        if not count:
            self.since = now
        if carried:
            carried += rest  # still the batch being built: extend it in place
        else:
            carried = rest
        self.parts, self.receipts = carried, receipts
        self.size, self.count = size + ends[-1] - base, count + n - i
        return sealed, queued

    def _add_many_big(self, msgs: list[bytes], seq: int, now: float) -> tuple[list[WriteBatch], int]:
        """:meth:`add_many` when a message may be too big for the conservative limit: such a
        message becomes a batch of its own (or raises MessageTooLarge, before any change)."""
        limit = self.body_limit
        alone = {i: self.alone(m) for i, m in enumerate(msgs)
                 if len(m) + MAX_MSG_OVERHEAD > limit and len(msg_header(len(m))) + len(m) + 2 > limit}
        # Build in locals, then commit in one step.
        carried = self.parts
        parts: list[bytes] = []
        size, count, since, receipts = self.size, self.count, self.since, self.receipts
        queued = 0
        sealed: list[WriteBatch] = []
        for i, m in enumerate(msgs, seq + 1):
            big = alone.get(i - seq - 1)
            head = msg_header(len(m))
            framed = len(head) + len(m) + 2
            if big is not None or size + framed > limit:
                if count:
                    batch = self.make(carried + parts if carried else parts, count, i - 1)
                    batch.receipts, receipts = receipts, None
                    queued += batch.size - size
                    sealed.append(batch)
                    carried, parts, size, count = [], [], 0, 0
                if big is not None:
                    big.last_seq = i
                    queued += big.size
                    sealed.append(big)
                    continue
            if not count:
                since = now
            parts += (head, m, CRLF)
            size += framed
            count += 1
            queued += framed
        if carried:
            carried += parts
        else:
            self.parts = parts
        self.size, self.count, self.since, self.receipts = size, count, since, receipts
        return sealed, queued

    def alone(self, m: bytes) -> WriteBatch:
        """A batch of one message too big for the conservative limit (it may still fit, exactly).

        Raises :class:`MessageTooLarge` when it cannot fit at all.  The caller sets
        ``last_seq`` and queues it.
        """
        batch = self.make([msg_header(len(m)), m, CRLF], 1, 0)
        if batch.size > self.batch_size:
            raise MessageTooLarge(
                f"message of {len(m)} bytes does not fit in a batch of {self.batch_size} bytes "
                f"(the BATCH line and MSG framing take {batch.size - len(m)})"
            )
        return batch
