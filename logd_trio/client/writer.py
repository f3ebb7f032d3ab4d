"""Batching, pipelining writer: ``async with client.writer(topic) as w: await w.write(b"...")``.

How it works.  :meth:`Writer.write` copies the message into the batch being
built.  A batch is *sealed* (its ``BATCH`` request encoded once) when the next
message would not fit in ``batch_size`` bytes (request line included, never
above the server's ``MaxBatchSize`` from CONFIG), when ``flush_interval`` has
passed since its first message, or on :meth:`Writer.flush`.  Sealed batches are
pipelined on one connection, at most ``max_in_flight`` unacknowledged
(:mod:`logd_trio.client.pipeline`).  When more than ``max_pending`` bytes are
queued and not yet sent, ``write`` waits (backpressure).

Receipts.  ``write`` / ``write_many`` are the fast path; ``await w.send_and_wait(msg)``
(or ``await (await w.send(msg))``) gives one message's offset and delta, or its error.

Failures.  A batch the server rejects (``ERR``) or whose connection breaks
before its reply arrives (or, with ``ack_timeout``, whose reply does not come
in time) is appended to :attr:`Writer.failed` with its ``error``; nothing is
dropped.  Failed batches count against ``max_pending``: when they alone fill
it, ``write`` raises :class:`~logd_trio.core.errors.WriteFailed` instead of
queueing more (nothing would make room: call :meth:`Writer.retry_failed` or
clear ``failed``).  A *permanent* error (a refused topic, a request the server
will never accept) stops the writer at once: the batches queued behind it fail
with the same error and every later ``write`` raises ``WriteFailed``.
:meth:`Writer.flush` raises ``WriteFailed`` when any batch failed.  The writer
reconnects for the next batch (with ``resend=True`` the unanswered ones first);
when connecting fails, every queued batch fails with that error at once.
:meth:`Writer.retry_failed` sends failed batches again (at-least-once: a batch
whose reply was lost may have been stored, and is then stored twice).
Leaving the ``async with`` block normally flushes, and raises ``WriteFailed``
if failed batches remain (clear ``w.failed`` to accept the loss).

An exception raised by ``on_ack`` does not stop the writer: the first one is
raised from the next ``flush`` / ``retry_failed``, or when the block exits.

Cancellation (under Trio Ctrl-C too, deferred to the caller's next checkpoint):

* ``write``: if it returns, the message is queued; if it raises (a
  cancellation, ``MessageTooLarge``, ``WriterClosed``, ``WriteFailed``), it is
  not.  It waits only for backpressure, and a cancelled wait leaves nothing behind.
* ``flush`` / ``retry_failed``: cancelling only stops the waiting; queued and
  re-queued batches are still sent, and their outcome shows in the counters
  and :attr:`Writer.failed`.
* leaving the block because of an exception or cancellation still flushes,
  shielded, for at most ``close_timeout`` seconds; whatever was not
  acknowledged by then is moved to :attr:`Writer.failed` (for batches already
  sent the outcome is unknown), and the original exception propagates.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Final, Unpack

import anyio
import anyio.abc

from logd_trio.client.batches import CRLF, Ack, Receipt, WriteBatch
from logd_trio.client.pipeline import AckCallback, Pipeline, WriterOptions, _close
from logd_trio.client.transport import (
    ClientLike,
    check_topic,
    deadline,
    fast_checkpoint_if_cancelled,
    ki_protected,
    raise_leaf,
)
from logd_trio.core.errors import WriteFailed, WriterClosed
from logd_trio.core.framing import msg_header

__all__ = ["Ack", "AckCallback", "Receipt", "WriteBatch", "Writer", "WriterOptions", "open_writer"]

Data = bytes | bytearray | memoryview
DEFAULT_OPEN_TIMEOUT: Final = 10.0


class Writer(Pipeline):
    """Writes messages to one topic in batches.  Open it with :meth:`Client.writer`.

    Options: ``batch_size`` (bytes per BATCH request, at most the server's
    maximum), ``flush_interval`` (seconds before a partial batch is sent; None:
    only when full or flushed), ``max_in_flight`` (unacknowledged batches),
    ``max_in_flight_bytes`` (if given, ``max_in_flight`` is at most this over the batch
    size, at least 1), ``max_pending`` (bytes queued before ``write`` waits; by default
    the batch size times ``max_in_flight`` + 1, at least 1 MiB), ``on_ack(offset,
    count)``, ``close_timeout`` (the exit flush after an error), ``ack_timeout``
    (a batch not acknowledged within it fails), ``open_timeout`` (opening:
    asking the server its batch size), ``resend`` (a batch whose connection broke before
    its reply is sent again on a new one, 3 times at most: at-least-once).

    Attributes: ``failed`` (list of :class:`WriteBatch`), ``acked_batches``,
    ``acked_messages``, ``last_offset`` (offset of the last acknowledged batch).
    """

    def __init__(
        self,
        client: ClientLike,
        topic: str,
        *,
        batch_size: int | None = None,
        flush_interval: float | None = 0.4,
        max_in_flight: int = 32,
        max_in_flight_bytes: int | None = None,
        max_pending: int | None = None,
        on_ack: AckCallback | None = None,
        close_timeout: float = 5.0,
        ack_timeout: float | None = None,
        open_timeout: float | None = DEFAULT_OPEN_TIMEOUT,
        resend: bool = False,
    ) -> None:
        raw = check_topic(topic)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if flush_interval is not None and flush_interval < 0:
            raise ValueError("flush_interval must be >= 0 or None")
        if ack_timeout is not None and not ack_timeout > 0:
            raise ValueError("ack_timeout must be > 0 or None")
        if open_timeout is not None and not open_timeout > 0:
            raise ValueError("open_timeout must be > 0 or None")
        super().__init__(client, topic, raw, max_in_flight=max_in_flight,
                         flush_interval=math.inf if flush_interval is None else flush_interval,
                         ack_timeout=ack_timeout, on_ack=on_ack, resend=resend)
        self._requested_batch_size = batch_size
        self._in_flight_bytes = max_in_flight_bytes
        self._max_pending_opt = max_pending
        self.close_timeout = close_timeout
        self.open_timeout = open_timeout
        self.batch_size = 0
        self.max_pending = 0
        self._checkpoint_if_cancelled: Callable[[], Awaitable[None]] = anyio.lowlevel.checkpoint_if_cancelled

    # ------------------------------------------------------------ public API

    @property
    def pending_messages(self) -> int:
        """Messages queued (re-queued ones included) and not yet acknowledged or failed."""
        return self._pending

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet sent: what ``max_pending`` bounds (with the failed batches)."""
        return self._queued_bytes

    @ki_protected
    async def write(self, message: Data) -> None:
        """Queue one message (copied).  Returns once queued; see the module doc for cancellation."""
        if self._closing or self._fatal is not None or self._queued_bytes + self._failed_bytes >= self.max_pending:
            await self._admit("write()")  # raises, or waits for room
        else:
            await self._checkpoint_if_cancelled()
        if self._add(bytes(message)):
            await anyio.lowlevel.cancel_shielded_checkpoint()

    @ki_protected
    async def send(self, message: Data) -> Receipt:
        """Queue one message like :meth:`write` and return its :class:`Receipt` (``await`` it
        for the :class:`Ack`: offset and delta, or the batch's error)."""
        await self._admit("send()")
        receipt = Receipt(0)
        if self._add(bytes(message), receipt):
            await anyio.lowlevel.cancel_shielded_checkpoint()
        return receipt

    async def send_and_wait(self, message: Data) -> Ack:
        """Queue one message and wait for its acknowledgement: its :class:`Ack` (offset, delta).

        Raises the batch's error (after it was added to :attr:`failed`) if it failed.
        """
        receipt = await self.send(message)
        if not receipt.done and self._b.receipts and receipt in self._b.receipts:
            self._seal()  # waiting for it: don't wait for the batch to fill up
            self._wake()
        return await receipt

    @ki_protected
    async def write_many(self, messages: Iterable[Data]) -> int:
        """Queue several messages at once (copied); returns how many.  All or nothing:

        it waits for backpressure first, then queues every message without
        waiting again (the queue may exceed ``max_pending`` by this call's size).
        If it raises, none was queued (messages are checked for size first).
        Much cheaper per message than :meth:`write`.
        """
        await self._admit("write_many()")
        msgs = list(map(bytes, messages))
        sealed, queued = self._b.add_many(msgs, self._seq, anyio.current_time())
        self._seq += len(msgs)
        self._pending += len(msgs)
        self._queued_bytes += queued
        self._sealed.extend(sealed)
        self._wake()
        if sealed:
            await anyio.lowlevel.cancel_shielded_checkpoint()
        return len(msgs)

    @ki_protected
    async def flush(self) -> None:
        """Send everything queued so far and wait until each batch is acknowledged or failed.

        Raises the first exception ``on_ack`` raised since the last time one was
        raised, then :class:`WriteFailed` if :attr:`failed` is not empty.
        """
        await self._flush_wait()
        self._raise_callback_error()
        self._raise_failed()
        await anyio.lowlevel.checkpoint()

    @ki_protected
    async def retry_failed(self) -> None:
        """Re-send every batch in :attr:`failed` (in order) and wait for their outcome.

        Batches that fail again are back in :attr:`failed` afterwards (no exception:
        look at :attr:`failed`).  After a permanent error the writer stays stopped:
        this raises :class:`WriteFailed`.
        """
        self._raise_fatal()
        batches, self.failed = self.failed, []
        self._failed_bytes = 0
        for batch in batches:
            batch.error = None
            batch.resolved = False
            self._queued_bytes += batch.size
            self._pending += batch.count
        self._ready.extend(batches)
        self._retrying = [b for b in self._retrying if not b.resolved] + batches
        self._wake()
        while any(not b.resolved for b in batches):
            self._check_running()
            await self._progress.wait()
        self._raise_callback_error()
        await anyio.lowlevel.checkpoint()

    # ------------------------------------------------------------ admission and batching

    async def _admit(self, what: str) -> None:
        """Wait for room under ``max_pending``; raise when the writer takes no more messages."""
        if self._closing:
            raise WriterClosed(f"{what} on a closed writer")
        self._raise_fatal()
        await anyio.lowlevel.checkpoint_if_cancelled()
        while self._full():
            b = self._b
            if b.count and b.size + self._failed_bytes >= self.max_pending:
                # it fills max_pending alone (max_pending < batch size): only sending it makes room
                self._seal()
                self._wake()
            await self._progress.wait()
            if self._closing:
                raise WriterClosed(f"{what} on a closed writer")
            self._raise_fatal()

    def _full(self) -> bool:
        queued = self._queued_bytes
        if queued + self._failed_bytes < self.max_pending:
            return False
        self._failed_bytes = sum(b.size for b in self.failed)  # the caller may have removed some
        if self._failed_bytes >= self.max_pending:
            # Failed batches alone fill the budget: nothing the writer does will make room.
            self._raise_failed(f"{len(self.failed)} failed batch(es) hold max_pending ({self.max_pending} bytes; "
                               f"first error: {self.failed[0].error}); retry_failed() or clear failed to go on")
        return queued + self._failed_bytes >= self.max_pending

    def _add(self, m: bytes, receipt: Receipt | None = None) -> bool:
        """Queue ``m`` (MessageTooLarge before anything changes); True when it sealed a batch."""
        b = self._b
        head = msg_header(len(m))
        framed = len(head) + len(m) + 2
        if b.size + framed <= b.body_limit:  # it joins the batch being built
            if receipt is not None:
                receipt.delta = b.size
                if b.receipts is None:
                    b.receipts = []
                b.receipts.append(receipt)
            b.parts += (head, m, CRLF)
            b.size += framed
            b.count += 1
            self._queued_bytes += framed
            self._seq += 1
            self._pending += 1
            if b.count == 1:
                b.since = anyio.current_time()
                self._wake()
            return False
        alone = b.alone(m) if framed > b.body_limit else None
        if b.count:
            self._seal()
        self._seq += 1
        self._pending += 1
        receipts = [receipt] if receipt is not None else None
        if alone is not None:
            alone.last_seq = self._seq
            alone.receipts = receipts
            self._queued_bytes += alone.size
            self._sealed.append(alone)
        else:
            b.parts = [head, m, CRLF]
            b.size = framed
            b.count = 1
            b.since = anyio.current_time()
            b.receipts = receipts
            self._queued_bytes += framed
        self._wake()
        return True

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            self._raise_failed(f"the writer stopped after a permanent error: {self._fatal}")

    def _raise_failed(self, message: str | None = None) -> None:
        if not self.failed and message is None:
            return
        first = self.failed[0].error if self.failed else self._fatal
        text = message or (f"{len(self.failed)} batch(es) of {sum(b.count for b in self.failed)} message(s) "
                           f"failed; first error: {first}")
        raise WriteFailed(text, list(self.failed)) from first

    # ------------------------------------------------------------ lifecycle

    async def _start(self, tg: anyio.abc.TaskGroup) -> None:
        with deadline(self.open_timeout, f"no answer to CONFIG from {getattr(self._client, 'address', 'the server')}"):
            server_max = await self._client.max_batch_size()
        size = min(self._requested_batch_size or server_max, server_max)
        self._b.set_limit(size)
        self.batch_size = size
        if self._in_flight_bytes is not None:  # fewer batches in flight when they are big
            self.max_in_flight = max(1, min(self.max_in_flight, self._in_flight_bytes // size))
            self._slots = anyio.Semaphore(self.max_in_flight)  # nothing was sent yet
        self.max_pending = self._max_pending_opt or max(size * (self.max_in_flight + 1), 1 << 20)
        self._tg = tg
        self._checkpoint_if_cancelled = fast_checkpoint_if_cancelled()
        await tg.start(self._sender)


@asynccontextmanager
@ki_protected  # under Trio, Ctrl-C during the exit flush arrives at a checkpoint, not mid-step
async def open_writer(client: ClientLike, topic: str, **options: Unpack[WriterOptions]) -> AsyncIterator[Writer]:
    """The context manager behind :meth:`Client.writer` (see :class:`Writer` for options)."""
    w = Writer(client, topic, **options)
    normal = False
    try:
        async with anyio.create_task_group() as tg:
            await w._start(tg)
            try:
                try:
                    yield w
                finally:
                    w._closing = True
                await w._drain()
                normal = True
            except BaseException:
                # The body raised, or the flush was cancelled or interrupted: flush what can be
                # flushed within close_timeout, shielded (under Trio a second Ctrl-C stops it).
                with anyio.move_on_after(w.close_timeout, shield=True):
                    await w._drain()
                raise
            finally:
                for conn in w._stop():
                    tg.start_soon(_close, conn)
    except BaseExceptionGroup as group:
        raise_leaf(group)
    if normal:
        w._raise_callback_error()
        w._raise_failed()
