"""Batching, pipelining writer: ``async with client.writer(topic) as w: await w.write(b"...")``.

How it works.  :meth:`Writer.write` copies the message into the batch being
built.  A batch is *sealed* (its ``BATCH`` request encoded once, with
``bytes.join``) when the next message would not fit in ``batch_size`` bytes
(request line included, never above the server's ``MaxBatchSize`` from
CONFIG), when ``flush_interval`` has passed since its first message, or on
:meth:`Writer.flush`.  A sender task writes sealed batches to one connection
without waiting for their replies, keeping at most ``max_in_flight`` of them
unacknowledged; a receiver task matches the ``OK``/``ERR`` replies to them in
FIFO order.  When more than ``max_pending`` bytes are queued and not yet sent,
``write`` waits (backpressure).

Failures.  A batch the server rejects (``ERR``) or whose connection breaks
before its reply arrives (or, with ``ack_timeout``, whose reply does not come
in time) is appended to :attr:`Writer.failed` as a :class:`WriteBatch` with
its ``error``; nothing is dropped.  The writer reconnects for the next batch.
When connecting fails (after the client's retries), every queued batch fails
with that error at once, so a dead server costs one retry policy, not one per
batch.  :meth:`Writer.retry_failed` sends the failed
batches again (at-least-once: a batch whose reply was lost may have been
stored, and is then stored twice).  Leaving the ``async with`` block normally
flushes, and raises :class:`~logd_trio.core.errors.WriteFailed` if failed batches
remain (clear ``w.failed`` to accept the loss).

An exception raised by ``on_ack`` does not stop the writer: the first one is
raised from the next :meth:`Writer.flush` / :meth:`Writer.retry_failed`, or
when the block exits.

Cancellation and Ctrl-C.  ``write``, ``write_many``, ``flush``, the background
tasks and the exit path are protected from ``KeyboardInterrupt``
(``trio.lowlevel.enable_ki_protection``): Ctrl-C is raised at the caller's next
checkpoint instead, as a cancellation would be, so it never leaves a batch half
built or stops the tasks that the exit flush needs.
* ``write``: if it returns, the message is queued; if it raises (``Cancelled``,
  ``MessageTooLarge``, ``WriterClosed``), it is not.  It waits only for
  backpressure, and a cancelled wait leaves nothing behind.
* ``flush`` / ``retry_failed``: cancelling only stops the waiting; queued and
  re-queued batches are still sent, and their outcome shows in the counters
  and :attr:`Writer.failed`.
* leaving the block because of an exception or cancellation (Ctrl-C
  included) still flushes, shielded, for at most ``close_timeout`` seconds;
  whatever was not acknowledged by then is moved to :attr:`Writer.failed`
  (for batches already sent the outcome is unknown), and the original
  exception propagates.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import trio

from logd_trio.core.errors import (
    ClientError,
    ConnectionLost,
    LogdError,
    MessageTooLarge,
    Timeout,
    WriteFailed,
    WriterClosed,
)
from logd_trio.core.framing import iter_messages
from logd_trio.core.replies import ErrorReply, OffsetReply, Reply, ReplyKind

if TYPE_CHECKING:
    from logd_trio.client.client import Client, Connection

__all__ = ["AckCallback", "WriteBatch", "Writer", "open_writer"]

AckCallback = Callable[[int, int], None]
_CRLF: Final = b"\r\n"


class WriteBatch:
    """A sealed batch: the encoded ``BATCH`` request and, once it failed, its ``error``."""

    __slots__ = ("count", "error", "last_seq", "offset", "request", "resolved", "topic")

    def __init__(self, topic: str, request: bytes, count: int, last_seq: int) -> None:
        self.topic = topic
        self.request = request
        self.count = count
        self.last_seq = last_seq
        self.error: LogdError | None = None
        self.offset: int | None = None
        self.resolved = False

    def messages(self) -> Iterator[bytes]:
        """The messages of this batch, in order."""
        body = self.request[self.request.index(_CRLF) + 2 :]
        return (m for _, m in iter_messages(body))

    def __repr__(self) -> str:
        return f"<WriteBatch {self.topic} count={self.count} size={len(self.request)} error={self.error!r}>"


class _Link:
    """One connection with the batches sent on it and not yet answered."""

    __slots__ = ("conn", "dead", "inflight", "wait")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.inflight: deque[WriteBatch] = deque()
        self.dead = False
        # the receiver's wait for the next reply (with ack_timeout): the sender arms its deadline
        self.wait: trio.CancelScope | None = None


class Writer:
    """Writes messages to one topic in batches.  Open it with :meth:`Client.writer`.

    Attributes: ``failed`` (list of :class:`WriteBatch`), ``acked_batches``,
    ``acked_messages``, ``last_offset`` (offset of the last acknowledged batch).
    """

    def __init__(
        self,
        client: Client,
        topic: str,
        *,
        batch_size: int | None = None,
        flush_interval: float | None = 0.4,
        max_in_flight: int = 32,
        max_pending: int | None = None,
        on_ack: AckCallback | None = None,
        close_timeout: float = 5.0,
        ack_timeout: float | None = None,
    ) -> None:
        from logd_trio.client.client import _check_topic

        self.topic = topic
        self._topic_raw = _check_topic(topic)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if flush_interval is not None and flush_interval < 0:
            raise ValueError("flush_interval must be >= 0 or None")
        if ack_timeout is not None and not ack_timeout > 0:
            raise ValueError("ack_timeout must be > 0 or None")
        self._client = client
        self._requested_batch_size = batch_size
        self.flush_interval = math.inf if flush_interval is None else flush_interval
        self.max_in_flight = max_in_flight
        self._max_pending_opt = max_pending
        self.on_ack = on_ack
        self.close_timeout = close_timeout
        self.ack_timeout = ack_timeout
        self.batch_size = 0
        self.max_pending = 0
        self._body_limit = 0
        # the batch being built
        self._parts: list[bytes] = []
        self._cur_size = 0
        self._cur_count = 0
        self._cur_since = 0.0
        # queued (sealed, not yet sent), retried, and accounting
        self._sealed: deque[WriteBatch] = deque()
        self._ready: deque[WriteBatch] = deque()
        self._queued_bytes = 0
        self._seq = 0
        self._seq_resolved = 0
        self._retrying: list[WriteBatch] = []
        self._in_hand: WriteBatch | None = None
        self._link: _Link | None = None
        self._links: list[_Link] = []
        self._slots = trio.Semaphore(max_in_flight)
        self._wake_sender = trio.Event()
        self._progress = trio.Event()
        self._closing = False
        self._crashed = False
        self._scopes: list[trio.CancelScope] = []
        self._nursery: trio.Nursery | None = None
        self._callback_error: Exception | None = None  # the first exception on_ack raised
        self.failed: list[WriteBatch] = []
        self.acked_batches = 0
        self.acked_messages = 0
        self.last_offset: int | None = None

    # ------------------------------------------------------------ public API

    @trio.lowlevel.enable_ki_protection
    async def write(self, message: bytes | bytearray | memoryview) -> None:
        """Queue one message (copied).  Returns once queued; see the module doc for cancellation."""
        if self._closing:
            raise WriterClosed("write() on a closed writer")
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._queued_bytes >= self.max_pending:
            await self._progress.wait()
            if self._closing:
                raise WriterClosed("write() on a closed writer")
        m = bytes(message)
        head = b"MSG %d\r\n" % len(m)
        framed = len(head) + len(m) + 2
        if self._cur_size + framed <= self._body_limit:  # it joins the batch being built
            self._parts += (head, m, _CRLF)
            self._cur_size += framed
            self._queued_bytes += framed
            self._seq += 1
            self._cur_count += 1
            if self._cur_count == 1:
                self._cur_since = trio.current_time()
                self._wake()
            return
        # Raises MessageTooLarge before anything changes.
        alone = self._alone(head, m) if framed > self._body_limit else None
        if self._cur_count:
            self._seal()
        self._seq += 1
        if alone is not None:
            alone.last_seq = self._seq
            self._queued_bytes += len(alone.request)
            self._sealed.append(alone)
        else:
            self._parts = [head, m, _CRLF]
            self._cur_size = framed
            self._cur_count = 1
            self._cur_since = trio.current_time()
            self._queued_bytes += framed
        self._wake()
        await trio.lowlevel.cancel_shielded_checkpoint()

    @trio.lowlevel.enable_ki_protection
    async def write_many(self, messages: Iterable[bytes | bytearray | memoryview]) -> int:
        """Queue several messages at once (copied); returns how many.  All or nothing:

        it waits for backpressure first, then queues every message without
        waiting again (the queue may exceed ``max_pending`` by this call's size).
        If it raises, none was queued (messages are checked for size first).
        Much cheaper per message than :meth:`write`.
        """
        if self._closing:
            raise WriterClosed("write_many() on a closed writer")
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._queued_bytes >= self.max_pending:
            await self._progress.wait()
            if self._closing:
                raise WriterClosed("write_many() on a closed writer")
        msgs = [bytes(m) for m in messages]
        limit = self._body_limit
        # Messages too big for the conservative limit become batches of their own (this
        # raises MessageTooLarge for one that cannot fit at all, before anything changes).
        alone: dict[int, WriteBatch] = {}
        for i, m in enumerate(msgs):
            if len(m) + 28 > limit:
                head = b"MSG %d\r\n" % len(m)
                if len(head) + len(m) + 2 > limit:
                    alone[i] = self._alone(head, m)
        # Build in locals, then commit in one step: the batch being built (``carried``, then
        # ``parts``) and the writer's counters change together or not at all.
        carried = self._parts
        parts: list[bytes] = []
        size, count, since, seq = self._cur_size, self._cur_count, self._cur_since, self._seq
        queued = 0
        sealed: list[WriteBatch] = []
        now = trio.current_time()
        for i, m in enumerate(msgs):
            big = alone.get(i)
            head = b"MSG %d\r\n" % len(m)
            framed = len(head) + len(m) + 2
            if big is not None or size + framed > limit:
                if count:
                    batch = self._make_batch(carried + parts if carried else parts, count, seq)
                    queued += len(batch.request) - size
                    sealed.append(batch)
                    carried, parts, size, count = [], [], 0, 0
                if big is not None:
                    seq += 1
                    big.last_seq = seq
                    queued += len(big.request)
                    sealed.append(big)
                    continue
            if not count:
                since = now
            parts += (head, m, _CRLF)
            size += framed
            count += 1
            seq += 1
            queued += framed
        if carried:
            carried += parts  # still the batch being built: extend it in place
        else:
            self._parts = parts
        self._cur_size, self._cur_count, self._cur_since, self._seq = size, count, since, seq
        self._queued_bytes += queued
        self._sealed.extend(sealed)
        self._wake()
        if sealed:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return len(msgs)

    @trio.lowlevel.enable_ki_protection
    async def flush(self) -> None:
        """Send everything queued so far and wait until each batch is acknowledged or failed.

        Raises the first exception ``on_ack`` raised since the last time one was raised.
        """
        await self._flush_wait()
        self._raise_callback_error()
        await trio.lowlevel.checkpoint()

    @trio.lowlevel.enable_ki_protection
    async def retry_failed(self) -> None:
        """Re-send every batch in :attr:`failed` (in order) and wait for their outcome.

        Batches that fail again are back in :attr:`failed` afterwards.
        """
        batches, self.failed = self.failed, []
        for b in batches:
            b.error = None
            b.resolved = False
            self._queued_bytes += len(b.request)
        self._ready.extend(batches)
        self._retrying = [b for b in self._retrying if not b.resolved] + batches
        self._wake()
        while any(not b.resolved for b in batches):
            if self._crashed:
                raise WriterClosed("the writer's background task failed")
            await self._progress.wait()
        self._raise_callback_error()
        await trio.lowlevel.checkpoint()

    async def _flush_wait(self) -> None:
        target = self._seq
        retrying = list(self._retrying)
        if self._cur_count:
            self._seal()
        self._wake()  # also when nothing is being built: sealed batches may be waiting
        while self._seq_resolved < target or any(not b.resolved for b in retrying):
            if self._crashed:
                raise WriterClosed("the writer's background task failed")
            await self._progress.wait()

    def _raise_callback_error(self) -> None:
        err, self._callback_error = self._callback_error, None
        if err is not None:
            raise err

    @property
    def pending_messages(self) -> int:
        """Messages queued and not yet acknowledged or failed."""
        return self._seq - self._seq_resolved

    # ------------------------------------------------------------ batching

    def _limits(self, server_max: int) -> None:
        size = min(self._requested_batch_size or server_max, server_max)
        if size < 64:
            raise ValueError(f"batch_size {size} is too small")
        self.batch_size = size
        # longest possible request line: BATCH <size> <topic> <crc> <count>\r\n
        digits = len(str(size))
        self._body_limit = size - (6 + digits + 1 + len(self._topic_raw) + 1 + 10 + 1 + digits + 2)
        self.max_pending = self._max_pending_opt or max(size * (self.max_in_flight + 1), 1 << 20)

    def _make_batch(self, parts: list[bytes], count: int, last_seq: int) -> WriteBatch:
        body = b"".join(parts)
        request = b"BATCH %d %s %d %d\r\n%s" % (len(body), self._topic_raw, zlib.crc32(body), count, body)
        return WriteBatch(self.topic, request, count, last_seq)

    def _seal(self) -> None:
        batch = self._make_batch(self._parts, self._cur_count, self._seq)
        self._queued_bytes += len(batch.request) - self._cur_size
        self._sealed.append(batch)
        self._parts = []
        self._cur_size = 0
        self._cur_count = 0

    def _alone(self, head: bytes, m: bytes) -> WriteBatch:
        """A batch of one message too big for the conservative limit (it may still fit, exactly).

        Changes nothing; the caller sets ``last_seq`` and queues it.
        """
        batch = self._make_batch([head, m, _CRLF], 1, 0)
        if len(batch.request) > self.batch_size:
            raise MessageTooLarge(
                f"message of {len(m)} bytes does not fit in a batch of {self.batch_size} bytes "
                f"(the BATCH line and MSG framing take {len(batch.request) - len(m)})"
            )
        return batch

    def _wake(self) -> None:
        self._wake_sender.set()
        self._wake_sender = trio.Event()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _resolve(self, batch: WriteBatch, error: LogdError | None, offset: int | None = None) -> None:
        batch.resolved = True
        if batch.last_seq > self._seq_resolved:
            self._seq_resolved = batch.last_seq
        if error is not None:
            batch.error = error
            self.failed.append(batch)
        else:
            batch.offset = offset
            self.acked_batches += 1
            self.acked_messages += batch.count
            self.last_offset = offset
            if self.on_ack is not None and offset is not None:
                try:
                    self.on_ack(offset, batch.count)
                except Exception as exc:  # the user's bug must not stop the acknowledgements
                    if self._callback_error is None:
                        exc.add_note("raised by the writer's on_ack callback (the writer went on)")
                        self._callback_error = exc
        self._notify()

    def _fail_queued(self, error: LogdError) -> None:
        """Connecting failed: fail every batch waiting to be sent (in order) with ``error``."""
        for queue in (self._ready, self._sealed):
            while queue:
                batch = queue.popleft()
                self._queued_bytes -= len(batch.request)
                self._resolve(batch, error)

    # ------------------------------------------------------------ tasks

    async def _next_batch(self) -> WriteBatch:
        while True:
            if self._ready:
                return self._ready.popleft()
            if self._sealed:
                return self._sealed.popleft()
            wake = self._wake_sender
            if self._cur_count:
                deadline = self._cur_since + self.flush_interval
                if self._closing or trio.current_time() >= deadline:
                    self._seal()
                    continue
                with trio.move_on_at(deadline):
                    await wake.wait()
            else:
                await wake.wait()

    @trio.lowlevel.enable_ki_protection
    async def _sender(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope(shield=True) as scope:
            self._scopes.append(scope)
            task_status.started()
            try:
                await self._send_loop()
            except BaseException:
                self._crashed = True
                self._notify()
                raise

    async def _send_loop(self) -> None:
        while True:
            batch = self._in_hand = await self._next_batch()
            await self._slots.acquire()
            self._queued_bytes -= len(batch.request)
            self._notify()
            try:
                link = await self._ensure_link()
            except ClientError as exc:
                # The client's retry policy is used up: the batches queued behind this one
                # would only wait as long again for the same answer.
                self._in_hand = None
                self._slots.release()
                self._resolve(batch, exc)
                self._fail_queued(exc)
                continue
            link.inflight.append(batch)
            self._in_hand = None
            if link.wait is not None and link.wait.deadline == math.inf and self.ack_timeout is not None:
                link.wait.deadline = trio.current_time() + self.ack_timeout
            try:
                await link.conn.send(batch.request)
            except ConnectionLost as exc:
                self._kill(link, exc)

    async def _ensure_link(self) -> _Link:
        link = self._link
        if link is not None and not link.dead:
            return link
        conn = await self._client.connect()
        link = self._link = _Link(conn)
        self._links.append(link)
        assert self._nursery is not None
        await self._nursery.start(self._receiver, link)
        return link

    @trio.lowlevel.enable_ki_protection
    async def _receiver(self, link: _Link, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope(shield=True) as scope:
            self._scopes.append(scope)
            task_status.started()
            try:
                await self._receive_loop(link)
            except BaseException:
                self._crashed = True
                self._notify()
                raise
            finally:
                self._scopes.remove(scope)

    async def _receive_loop(self, link: _Link) -> None:
        conn = link.conn
        timeout = self.ack_timeout
        while not link.dead:
            reply: Reply | None = None
            with trio.CancelScope() as wait:
                if timeout is not None:
                    # With batches in flight, the next reply is due within ack_timeout (the
                    # sender arms the deadline when it sends to an idle link).
                    link.wait = wait
                    if link.inflight:
                        wait.deadline = trio.current_time() + timeout
                try:
                    reply = await conn.receive(ReplyKind.OFFSET)
                except ConnectionLost as exc:
                    self._kill(link, exc)
                    return
            link.wait = None
            if reply is None:  # the deadline passed
                self._kill(link, Timeout(f"not acknowledged within {timeout:g} s (it may or may not be stored)"))
                return
            if not link.inflight:
                self._kill(link, ConnectionLost("reply without a request"))
                return
            batch = link.inflight.popleft()
            self._slots.release()
            if isinstance(reply, ErrorReply):
                self._resolve(batch, reply.exception())
            else:
                assert isinstance(reply, OffsetReply)
                self._resolve(batch, None, reply.offset)

    def _kill(self, link: _Link, exc: LogdError) -> None:
        """The link is broken: fail its unanswered batches (in order) and close it."""
        if link.dead:
            return
        link.dead = True
        if self._link is link:
            self._link = None
        while link.inflight:
            self._slots.release()
            self._resolve(link.inflight.popleft(), exc)
        if link in self._links:
            self._links.remove(link)
        assert self._nursery is not None
        self._nursery.start_soon(_close, link.conn)

    # ------------------------------------------------------------ lifecycle

    async def _start(self, nursery: trio.Nursery) -> None:
        self._limits(await self._client.max_batch_size())
        self._nursery = nursery
        await nursery.start(self._sender)

    async def _drain(self) -> None:
        self._closing = True
        self._notify()
        await self._flush_wait()
        while any(not b.resolved for b in self._retrying) and not self._crashed:
            await self._progress.wait()

    def _stop(self) -> list[Connection]:
        """Stop the tasks, move anything unresolved to ``failed``; returns the connections to close."""
        self._closing = True
        for scope in self._scopes:
            scope.cancel()
        lost = Timeout("not acknowledged before the writer closed (it may or may not be stored)")
        conns = []
        for link in self._links:
            link.dead = True
            conns.append(link.conn)
            while link.inflight:
                self._resolve(link.inflight.popleft(), lost)
        self._links.clear()
        self._link = None
        unsent = Timeout("not sent before the writer closed")
        if self._in_hand is not None and not self._in_hand.resolved:
            self._resolve(self._in_hand, unsent)
        if self._cur_count:
            self._seal()
        for queue in (self._ready, self._sealed):
            while queue:
                self._resolve(queue.popleft(), unsent)
        self._queued_bytes = 0
        return conns


@trio.lowlevel.enable_ki_protection
async def _close(conn: Connection) -> None:
    await conn.aclose()


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to show the user for a nursery's group (never a group)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)] or leaves
    first = real[0]
    for other in real[1:]:
        first.add_note(f"also raised: {other!r}")
    return first


@asynccontextmanager
@trio.lowlevel.enable_ki_protection  # Ctrl-C during the exit flush arrives at a checkpoint, not mid-step
async def open_writer(client: Client, topic: str, **options: object) -> AsyncIterator[Writer]:
    """The context manager behind :meth:`Client.writer` (see :class:`Writer` for options)."""
    w = Writer(client, topic, **options)  # type: ignore[arg-type]
    normal = False
    try:
        async with trio.open_nursery() as nursery:
            await w._start(nursery)
            try:
                try:
                    yield w
                finally:
                    w._closing = True
                await w._drain()
                normal = True
            except BaseException:
                # The body raised, or the flush was cancelled or interrupted (Ctrl-C): flush
                # what can be flushed within close_timeout, shielded; a second Ctrl-C stops it.
                with trio.CancelScope(shield=True) as cs:
                    cs.relative_deadline = w.close_timeout
                    await w._drain()
                raise
            finally:
                for conn in w._stop():
                    nursery.start_soon(_close, conn)
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None
    if normal:
        w._raise_callback_error()
        if w.failed:
            raise WriteFailed(
                f"{len(w.failed)} batch(es) of {sum(b.count for b in w.failed)} message(s) failed; "
                f"first error: {w.failed[0].error}",
                list(w.failed),
            )
