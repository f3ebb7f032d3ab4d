"""What a writer queues: sealed :class:`WriteBatch` requests, the batch being built, receipts.

Pure bookkeeping, no I/O: :class:`BatchBuilder` frames messages into the batch
being built and seals it into one ``BATCH`` request (the one encoder,
:func:`logd_trio.core.framing.build_frame`) when the next message would not fit.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Final

import anyio

from logd_trio.core.errors import LogdError, MessageTooLarge
from logd_trio.core.framing import build_frame, iter_messages, msg_header

__all__ = ["Ack", "BatchBuilder", "Receipt", "WriteBatch"]

CRLF: Final = b"\r\n"
# bytes of a MSG header beyond the message itself, at most ("MSG " + 20 digits + CRLF) + CRLF
MAX_MSG_OVERHEAD: Final = 28


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
    """A sealed batch: the encoded ``BATCH`` request and, once it failed, its ``error``."""

    __slots__ = ("attempts", "count", "error", "last_seq", "offset", "receipts", "request", "resolved", "topic")

    def __init__(self, topic: str, request: bytes, count: int, last_seq: int) -> None:
        self.topic = topic
        self.request = request
        self.count = count
        self.last_seq = last_seq
        self.error: LogdError | None = None
        self.offset: int | None = None
        self.resolved = False
        self.receipts: list[Receipt] | None = None
        self.attempts = 0  # times sent

    def messages(self) -> list[bytes]:
        """The messages of this batch, in order."""
        start = self.request.index(CRLF) + 2
        return [m for _, m in iter_messages(self.request, start)]

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
        return f"<WriteBatch {self.topic} count={self.count} size={len(self.request)} error={self.error!r}>"


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
        return WriteBatch(self.topic, build_frame(self.topic_raw, b"".join(parts), count), count, last_seq)

    def seal(self, last_seq: int) -> WriteBatch:
        """The batch being built as a request; the builder starts empty again."""
        batch = self.make(self.parts, self.count, last_seq)
        batch.receipts, self.receipts = self.receipts, None
        self.parts = []
        self.size = 0
        self.count = 0
        return batch

    def alone(self, m: bytes) -> WriteBatch:
        """A batch of one message too big for the conservative limit (it may still fit, exactly).

        Raises :class:`MessageTooLarge` when it cannot fit at all.  The caller sets
        ``last_seq`` and queues it.
        """
        batch = self.make([msg_header(len(m)), m, CRLF], 1, 0)
        if len(batch.request) > self.batch_size:
            raise MessageTooLarge(
                f"message of {len(m)} bytes does not fit in a batch of {self.batch_size} bytes "
                f"(the BATCH line and MSG framing take {len(batch.request) - len(m)})"
            )
        return batch
