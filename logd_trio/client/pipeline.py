"""The writer's engine: queues of sealed batches, the sender and receiver tasks, outcomes.

:class:`Pipeline` owns everything between "a batch is sealed" and "its outcome
is known".  A sender task writes sealed batches to one connection without
waiting for their replies, keeping at most ``max_in_flight`` of them
unacknowledged; a receiver task per connection matches the ``OK``/``ERR``
replies to them in FIFO order.  :class:`logd_trio.client.writer.Writer` adds the
public API (building batches, backpressure, flush) on top."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from typing import TypedDict

import anyio
import anyio.abc

from logd_trio.client.batches import BatchBuilder, WriteBatch
from logd_trio.client.transport import ClientLike, Connection, ki_protected
from logd_trio.core.errors import ClientError, ConnectionLost, LogdError, Timeout, WriterClosed
from logd_trio.core.replies import ErrorReply, OffsetReply, Reply, ReplyKind

__all__ = ["AckCallback", "Pipeline", "WriterOptions"]

AckCallback = Callable[[int, int], None]
RESEND_ATTEMPTS = 3  # with resend: a batch is sent at most this many times
SEND_SIZE = 1 << 20  # the sender joins queued batches into one send up to this many bytes


class WriterOptions(TypedDict, total=False):
    """The keyword options of :meth:`Client.writer` (checked by type checkers, see :class:`Writer`)."""

    batch_size: int | None
    flush_interval: float | None
    max_in_flight: int
    max_in_flight_bytes: int | None
    max_pending: int | None
    on_ack: AckCallback | None
    close_timeout: float
    ack_timeout: float | None
    open_timeout: float | None
    resend: bool


class _Link:
    """One connection with the batches sent on it and not yet answered."""

    __slots__ = ("conn", "dead", "inflight", "wait")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.inflight: deque[WriteBatch] = deque()
        self.dead = False
        # the receiver's wait for the next reply (with ack_timeout): the sender arms its deadline
        self.wait: anyio.CancelScope | None = None


class Pipeline:
    """Batches from sealed to resolved.  Accounting, in one place:

    * ``_queued_bytes``: bytes not yet handed to a connection (the batch being
      built, sealed and re-queued batches): what backpressure bounds;
    * ``_pending``: messages queued and not yet acknowledged or failed;
    * ``failed``: batches that failed, kept in order for :meth:`retry_failed`.
    """

    def __init__(self, client: ClientLike, topic: str, topic_raw: bytes, *, max_in_flight: int,
                 flush_interval: float, ack_timeout: float | None, on_ack: AckCallback | None,
                 resend: bool = False) -> None:
        self._client = client
        self.resend = resend
        self.topic = topic
        self.max_in_flight = max_in_flight
        self.flush_interval = flush_interval
        self.ack_timeout = ack_timeout
        self.on_ack = on_ack
        self._b = BatchBuilder(topic, topic_raw)
        self._sealed: deque[WriteBatch] = deque()
        self._ready: deque[WriteBatch] = deque()  # re-queued by retry_failed, sent first
        self._queued_bytes = 0
        self._pending = 0
        self._seq = 0  # messages ever queued
        self._retrying: list[WriteBatch] = []
        self._in_hand: WriteBatch | None = None  # taken by the sender, not yet in flight
        self._link: _Link | None = None
        self._links: list[_Link] = []
        self._slots = anyio.Semaphore(max_in_flight)
        self._wake_sender = anyio.Event()
        self._progress = anyio.Event()
        self._closing = False
        self._crashed = False
        self._fatal: ClientError | None = None  # the first permanent error: the writer stopped
        self._scopes: list[anyio.CancelScope] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._callback_error: Exception | None = None  # the first exception on_ack raised
        self.failed: list[WriteBatch] = []
        self._failed_bytes = 0  # bytes of the failed batches (high if the caller removed some)
        self.acked_batches = 0
        self.acked_messages = 0
        self.last_offset: int | None = None

    # ------------------------------------------------------------ accounting

    def _seal(self) -> None:
        b = self._b
        size = b.size
        batch = b.seal(self._seq)
        self._queued_bytes += batch.size - size
        self._sealed.append(batch)

    def _wake(self) -> None:
        self._wake_sender.set()
        self._wake_sender = anyio.Event()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    def _resolve(self, batch: WriteBatch, error: LogdError | None, offset: int | None = None) -> None:
        batch.settle(error, offset)
        self._pending -= batch.count
        if error is not None:
            failed = self.failed
            if failed and failed[-1].last_seq > batch.last_seq:  # in sequence order, as sent
                bisect.insort(failed, batch, key=_seq_of)
            else:
                failed.append(batch)
            self._failed_bytes += batch.size
            if isinstance(error, ClientError) and error.permanent and self._fatal is None:
                self._fatal = error
                self._fail_queued(error)  # they would get the same answer
        else:
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
        """Fail every batch waiting to be sent (in order), the one being built too, with ``error``."""
        if self._b.count:
            self._seal()
        for queue in (self._ready, self._sealed):
            while queue:
                batch = queue.popleft()
                self._queued_bytes -= batch.size
                self._resolve(batch, error)

    # ------------------------------------------------------------ tasks

    async def _next_batch(self) -> WriteBatch:
        while True:
            if self._ready:
                return self._ready.popleft()
            if self._sealed:
                return self._sealed.popleft()
            wake = self._wake_sender
            if self._b.count:
                deadline = self._b.since + self.flush_interval
                if self._closing or anyio.current_time() >= deadline:
                    self._seal()
                    continue
                with anyio.CancelScope(deadline=deadline):
                    await wake.wait()
            else:
                await wake.wait()

    @ki_protected
    async def _sender(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.CancelScope(shield=True) as scope:
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
            # The slot first, then the batch: batches re-queued (resend) while this waited
            # for a slot are taken before the ones queued after them.
            await self._slots.acquire()
            batch = self._in_hand = await self._next_batch()
            self._queued_bytes -= batch.size
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
            batch.attempts += 1
            self._in_hand = None
            parts = self._more_for(link, batch)
            if link.wait is not None and link.wait.deadline == math.inf and self.ack_timeout is not None:
                link.wait.deadline = anyio.current_time() + self.ack_timeout
            try:
                await link.conn.send_many(parts)
            except ConnectionLost as exc:
                self._kill(link, exc)

    def _more_for(self, link: _Link, first: WriteBatch) -> list[bytes]:
        """The buffers of ``first`` and of the batches queued behind it that have a slot, up to
        SEND_SIZE bytes, in order: one send (and one wait) for the lot instead of one each, with
        no copy (each batch's head and body).  They are in flight from here on, like the first."""
        parts = [first.head, first.body]
        queue = self._ready or self._sealed
        if not queue or self._slots.value == 0:
            return parts
        size = first.size
        while queue and self._slots.value > 0 and size < SEND_SIZE:
            self._slots.acquire_nowait()
            batch = queue.popleft()
            self._queued_bytes -= batch.size
            link.inflight.append(batch)
            batch.attempts += 1
            parts += (batch.head, batch.body)
            size += batch.size
            queue = self._ready or self._sealed
        self._notify()
        return parts

    async def _ensure_link(self) -> _Link:
        link = self._link
        if link is not None and not link.dead:
            return link
        conn = await self._client.connect()
        link = self._link = _Link(conn)
        self._links.append(link)
        assert self._tg is not None
        await self._tg.start(self._receiver, link)
        return link

    @ki_protected
    async def _receiver(self, link: _Link, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                        ) -> None:
        with anyio.CancelScope(shield=True) as scope:
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
            try:
                if timeout is None:
                    reply = await conn.receive(ReplyKind.OFFSET)
                else:
                    with anyio.CancelScope() as wait:
                        # With batches in flight, the next reply is due within ack_timeout (the
                        # sender arms the deadline when it sends to an idle link).
                        link.wait = wait
                        if link.inflight:
                            wait.deadline = anyio.current_time() + timeout
                        reply = await conn.receive(ReplyKind.OFFSET)
                    link.wait = None
            except ConnectionLost as exc:
                self._kill(link, exc)
                return
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
        again: list[WriteBatch] = []
        while link.inflight:
            self._slots.release()
            batch = link.inflight.popleft()
            if self.resend and batch.attempts < RESEND_ATTEMPTS:
                again.append(batch)  # its outcome is unknown: send it again on a new connection
            else:
                self._resolve(batch, exc)
        if again:
            self._ready.extendleft(reversed(again))  # before anything queued after them
            self._queued_bytes += sum(b.size for b in again)
            self._wake()
        if link in self._links:
            self._links.remove(link)
        assert self._tg is not None
        self._tg.start_soon(_close, link.conn)

    # ------------------------------------------------------------ lifecycle

    def _raise_callback_error(self) -> None:
        err, self._callback_error = self._callback_error, None
        if err is not None:
            raise err

    def _check_running(self) -> None:
        if self._crashed:
            raise WriterClosed("the writer's background task failed")

    def _unresolved(self) -> deque[WriteBatch]:
        """Every batch not yet resolved, wherever it is now (queued, in hand, in flight)."""
        if self._b.count:
            self._seal()
        waiting: deque[WriteBatch] = deque()
        for link in self._links:
            waiting.extend(link.inflight)
        if self._in_hand is not None:
            waiting.append(self._in_hand)
        waiting.extend(self._ready)
        waiting.extend(self._sealed)
        waiting.extend(self._retrying)
        return waiting

    async def _flush_wait(self) -> None:
        # Each batch queued so far, not a running maximum of resolved sequence numbers: a
        # permanent error fails the queued batches while earlier ones are still in flight.
        waiting = self._unresolved()
        self._wake()  # also when nothing is being built: sealed batches may be waiting
        while waiting:
            if waiting[0].resolved:
                waiting.popleft()
                continue
            self._check_running()
            await self._progress.wait()

    async def _drain(self) -> None:
        self._closing = True
        self._notify()
        await self._flush_wait()
        while not self._crashed and (any(not b.resolved for b in self._retrying)
                                     or any(link.inflight for link in self._links)):
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
        if self._b.count:
            self._seal()
        for queue in (self._ready, self._sealed):
            while queue:
                self._resolve(queue.popleft(), unsent)
        self._queued_bytes = 0
        return conns


def _seq_of(batch: WriteBatch) -> int:
    return batch.last_seq


@ki_protected
async def _close(conn: Connection) -> None:
    await conn.aclose()
