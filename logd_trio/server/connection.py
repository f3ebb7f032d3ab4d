"""One task pair per connection: a reader that parses and dispatches requests,
and a writer that sends the replies strictly in request order.

The reader never waits for a reply: it queues a *pending reply* for every
request (bounded by ``pipeline_depth``) and goes on parsing, so a pipelined
client keeps the topic's group commit fed.  The writer coalesces replies that
are ready into one ``send`` and streams READ replies from the partition files
with ``os.sendfile``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Final

import trio

from logd_trio.core import requests as p
from logd_trio.core.errors import NotFound, RequestError, StorageError
from logd_trio.server.reasons import error_kind, error_reply
from logd_trio.server.registry import Registry
from logd_trio.server.replica.acks import AwaitReplicas
from logd_trio.server.replica.serving import serve_fetch
from logd_trio.server.stats import Counters, StatsRequest
from logd_trio.server.storage.reads import ReadPlan
from logd_trio.server.topic import Append

__all__ = ["Connection"]

log = logging.getLogger("logd_trio.server.connection")

RECV_START: Final = 16 * 1024
RECV_SIZE: Final = 256 * 1024
SENDFILE_CHUNK: Final = 1 << 20
# After an error that ends a connection, read and discard what the peer still
# sends for at most this long, so that closing does not reset the connection
# and destroy the ERR reply before the peer reads it.
LINGER_SECONDS: Final = 1.0
LINGER_BYTES: Final = 1 << 20
# --timeout grows with the request: each byte received adds 1/MIN_REQUEST_RATE seconds, so a large
# BATCH sent at this rate or faster is never cut off, while a trickle still is.
MIN_REQUEST_RATE: Final = 64 * 1024  # bytes/s
# Once a graceful shutdown has begun, a reply may wait this long for progress (instead of
# --timeout), so that a client that never reads does not hold the shutdown.
DRAIN_SEND_TIMEOUT: Final = 2.0


class _Closing:
    """Writer item: send ``reply`` then close the connection."""

    __slots__ = ("reply",)

    def __init__(self, reply: bytes) -> None:
        self.reply = reply


_Item = bytes | Append | AwaitReplicas | StatsRequest | p.Read | p.Tail | p.Fetch | _Closing

_CMD_NAMES: Final[dict[type, str]] = {
    p.Batch: "batch", p.Read: "read", p.Tail: "tail", p.Stats: "stats", p.Config: "config",
    p.Close: "close", p.Ping: "ping", p.Topics: "topics", p.Fetch: "fetch", p.Cluster: "cluster",
    p.Epochs: "epochs",
}


class Connection:
    """Serves one client socket until it closes, errs, or the server drains."""

    def __init__(self, stream: trio.SocketStream, registry: Registry,
                 stats: trio.MemorySendChannel[StatsRequest], counters: Counters,
                 on_close: Callable[[Connection], None]) -> None:
        self.sock = stream.socket
        self.stream = stream
        self.registry = registry
        self.config = registry.config
        self.stats = stats
        self.counters = counters
        self.parser = p.RequestParser(max_request=self.config.batch_size,
                                      max_messages=self.config.max_messages)
        self.read_scope = trio.CancelScope()
        self.inflight = 0
        self._on_close = on_close
        # Set when the peer stops sending (EOF): long-polls then answer at
        # once instead of holding a connection whose client has gone.
        self._eof = False
        self._poll_scope: trio.CancelScope | None = None
        # A batch queued at its topic whose reply slot the reader could not get before it was
        # stopped (graceful shutdown): the writer answers it last, so no stored batch loses its OK.
        self._orphan: Append | None = None
        # Bound on each wait for send progress (--timeout; shorter once draining).
        self.send_timeout = self.config.timeout or math.inf
        self._send_scope: trio.CancelScope | None = None

    def stop_reading(self) -> None:
        """Graceful shutdown: take no new request; in-flight ones still get replies
        (a waiting long-poll answers at once, as when its wait runs out), each send
        waiting at most DRAIN_SEND_TIMEOUT for progress."""
        self._eof = True
        self.read_scope.cancel()
        if self._poll_scope is not None:
            self._poll_scope.cancel()
        self.send_timeout = min(self.send_timeout, DRAIN_SEND_TIMEOUT)
        if self._send_scope is not None:
            self._send_scope.deadline = min(self._send_scope.deadline, trio.current_time() + self.send_timeout)

    async def run(self) -> None:
        send, recv = trio.open_memory_channel[_Item](self.config.pipeline_depth)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, recv, nursery.cancel_scope)
                async with send:
                    with self.read_scope:
                        await self._reader(send)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as eg:
            log.debug("connection ended: %r", eg.exceptions[0])
        except* Exception as eg:  # a bug must cost one connection, never the server
            log.error("connection closed after an internal error", exc_info=eg.exceptions[0])
        finally:
            self._on_close(self)
            self.sock.close()

    # ------------------------------------------------------------ reader

    async def _reader(self, out: trio.MemorySendChannel[_Item]) -> None:
        # Small until the peer fills it (a bulk sender), then RECV_SIZE: idle
        # connections cost little memory, busy ones few syscalls.
        view = memoryview(bytearray(RECV_START))
        parser = self.parser
        counters = self.counters
        idle = self.config.idle_timeout or math.inf
        timeout = self.config.timeout or math.inf
        # --timeout bounds the time spent waiting for the bytes of one request, from its
        # first byte to its last (not each wait alone: a trickle must not reset it), plus
        # 1/MIN_REQUEST_RATE s per byte of it received.  Time the reader spends waiting
        # for room in the pipeline does not count.
        budget = timeout
        while True:
            while True:
                try:
                    event = parser.next_event()
                except RequestError as e:
                    budget = timeout
                    counters.errors["protocol"] += 1
                    counters.error_kinds["protocol"] += 1
                    if e.close:
                        await out.send(_Closing(error_reply(e)))
                        return
                    await out.send(error_reply(e))
                    continue
                if event is p.NEED_DATA:
                    break
                budget = timeout
                if not await self._dispatch(event, out):
                    return
            partial = bool(parser.buffered)
            started = trio.current_time()
            with trio.move_on_after(max(budget, 0.0) if partial else idle) as cs:
                n = await self.sock.recv_into(view)
            if partial:
                budget -= trio.current_time() - started
            if not cs.cancelled_caught:
                budget += n / MIN_REQUEST_RATE  # the request's size buys time (reset when it is whole)
            if cs.cancelled_caught:
                if not partial:
                    if self.inflight or self.config.idle_timeout == 0:
                        continue
                    log.debug("closing connection: idle")
                    return
                log.debug("closing connection: a request did not arrive within --timeout")
                counters.error_kinds["timeout"] += 1
                self._eof = True  # a waiting long-poll answers now
                if self._poll_scope is not None:
                    self._poll_scope.cancel()
                await out.send(_Closing(p.reply_err("timeout")))
                return
            if n == 0:
                self._eof = True
                if self._poll_scope is not None:
                    self._poll_scope.cancel()
                return
            counters.bytes_in += n
            parser.receive_data(view[:n])
            if n == len(view) < RECV_SIZE:
                view = memoryview(bytearray(RECV_SIZE))

    async def _dispatch(self, req: p.Request, out: trio.MemorySendChannel[_Item]) -> bool:
        """Queue the pending reply for ``req``; False when the connection must stop reading."""
        counters = self.counters
        cmd = _CMD_NAMES[type(req)]
        counters.requests[cmd] += 1
        item: _Item
        try:
            if isinstance(req, p.Batch):
                self.registry.replica.refuse_writes()  # a follower: ERR not leader HOST:PORT
                topic = await self.registry.get_or_create(req.topic)
                # No checkpoint per batch: queue all the batches of one receive, then yield once.
                item = topic.try_append(req.frame, req.count) or await topic.append(req.frame, req.count)
                if self.registry.replica.await_acks:  # the reply waits for followers, cluster (server/replica/acks.py)
                    item = AwaitReplicas(item, topic.name, self.registry.replica)
            elif isinstance(req, p.Read | p.Tail | p.Fetch):
                # Resolved by the writer, in order: a READ pipelined after a
                # BATCH on this connection sees that batch.
                item = req
            elif isinstance(req, p.Cluster | p.Epochs):  # replication extensions (server/replica/state.py)
                item = self.registry.replica.extension_reply(req)
            elif isinstance(req, p.Ping):
                item = p.REPLY_PONG
            elif isinstance(req, p.Close):
                await out.send(_Closing(p.REPLY_OK))
                return False
            else:
                item = StatsRequest(req)  # sent to the stats task by the writer, in reply order
        except (NotFound, RequestError, StorageError) as e:
            counters.errors[cmd] += 1
            counters.error_kinds[error_kind(e)] += 1
            item = error_reply(e)
        self.inflight += 1
        try:
            out.send_nowait(item)
        except trio.WouldBlock:
            try:
                await out.send(item)
            except trio.Cancelled:
                if isinstance(item, Append):
                    self._orphan = item
                raise
        return True

    # ------------------------------------------------------------ writer

    async def _writer(self, items: trio.MemoryReceiveChannel[_Item], scope: trio.CancelScope) -> None:
        pending = bytearray()
        try:
            async with items:
                while True:
                    try:
                        item = items.receive_nowait()
                    except trio.WouldBlock:
                        if pending:
                            await self._send_all(pending)
                            pending.clear()
                        try:
                            item = await items.receive()
                        except trio.EndOfChannel:
                            if self._orphan is None:
                                break
                            item, self._orphan = self._orphan, None
                    except trio.EndOfChannel:
                        if self._orphan is None:
                            break
                        item, self._orphan = self._orphan, None
                    if isinstance(item, bytes):
                        pending += item
                    elif isinstance(item, Append):
                        if not item.done.is_set():
                            if pending:
                                await self._send_all(pending)
                                pending.clear()
                            await item.done.wait()
                        if item.error is None:
                            pending += b"OK %d 1\r\n" % item.offset
                        else:
                            self.counters.errors["batch"] += 1
                            self.counters.error_kinds[error_kind(item.error)] += 1
                            pending += error_reply(item.error)
                    elif isinstance(item, AwaitReplicas):
                        if not item.ready and pending:
                            await self._send_all(pending)
                            pending.clear()
                        pending += await item.answer(error_reply)
                    elif isinstance(item, p.Read | p.Tail):
                        await self._read(item, pending)
                    elif isinstance(item, p.Fetch):  # replication (server/replica/serving.py)
                        if (e := await serve_fetch(self, item, pending)) is not None:
                            pending += error_reply(e)
                    elif isinstance(item, StatsRequest):
                        await self.stats.send(item)
                        await item.done.wait()
                        pending += item.reply
                    else:
                        pending += item.reply
                        await self._send_all(pending)
                        await self._linger_close()
                        scope.cancel()
                        return
                    self.inflight -= 1
                if pending:
                    await self._send_all(pending)
        finally:
            scope.cancel()

    async def _read(self, req: p.Read | p.Tail, pending: bytearray) -> None:
        """Answer READ/TAIL (and the long-poll READ) into ``pending`` / the socket."""
        registry = self.registry
        topic = registry.get(req.topic)
        if isinstance(req, p.Read) and req.wait_ms is not None and (
            req.offset == (topic.readable_head if topic is not None else 0)
        ) and self.counters.longpoll_waiting < self.config.max_waiters:  # beyond: answer as a plain READ
            if pending:
                await self._send_all(pending)
                pending.clear()
            self.counters.longpoll_waiting += 1
            try:
                with trio.move_on_after(min(req.wait_ms / 1000, self.config.max_wait)) as scope:
                    self._poll_scope = scope
                    if self._eof:
                        scope.cancel()
                    while topic is None:
                        await registry.wait_created()
                        topic = registry.get(req.topic)
                    await topic.wait_for_data(req.offset)
            finally:
                self._poll_scope = None
                self.counters.longpoll_waiting -= 1
        t0 = time.perf_counter()
        try:
            if topic is None:
                raise NotFound(req.topic)
            plan = await topic.open_read(req.offset if isinstance(req, p.Read) else topic.first, req.limit)
        except (NotFound, StorageError) as e:
            self.counters.errors["read" if isinstance(req, p.Read) else "tail"] += 1
            self.counters.error_kinds[error_kind(e)] += 1
            pending += error_reply(e)
            return
        await self._send_plan(plan, pending)
        pending.clear()
        self.counters.histograms.read_latency.observe(time.perf_counter() - t0)

    async def _send_all(self, data: bytes | bytearray) -> None:
        """Send everything; ``--timeout`` bounds each wait for progress, not the whole reply."""
        view = memoryview(data)
        total = len(view)
        with trio.fail_after(self.send_timeout) as scope:
            self._send_scope = scope
            try:
                while view:
                    n = await self.sock.send(view)
                    view = view[n:]
                    scope.deadline = trio.current_time() + self.send_timeout
            finally:
                self._send_scope = None
        self.counters.bytes_out += total

    async def _send_plan(self, plan: ReadPlan, pending: bytearray, header: bytes | None = None) -> None:
        """Header (after what is pending) then the frames straight from the files."""
        with plan:
            pending += p.reply_read_header(plan.offset, plan.nbatches) if header is None else header
            await self._send_all(pending)
            out_fd = self.sock.fileno()
            with trio.fail_after(self.send_timeout) as scope:  # bounds each wait for progress
                self._send_scope = scope  # stop_reading() shortens it (left set after: harmless)
                for fd, pos, length in plan.segments:
                    while length:
                        try:
                            n = os.sendfile(out_fd, fd, pos, min(length, SENDFILE_CHUNK))
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(self.sock)
                            continue
                        if n == 0:
                            raise OSError("partition file shorter than its index")
                        pos += n
                        length -= n
                        self.counters.bytes_out += n
                        scope.deadline = trio.current_time() + self.send_timeout
                    await trio.lowlevel.checkpoint_if_cancelled()

    async def _linger_close(self) -> None:
        """Send FIN, then discard input briefly so the peer reads our last reply."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        buf = bytearray(65536)
        got = 0
        with trio.move_on_after(LINGER_SECONDS):
            while got < LINGER_BYTES:
                n = await self.sock.recv_into(buf)
                if n == 0:
                    break
                got += n
