"""One task pair per connection: a reader that parses and dispatches requests,
and a writer that sends the replies strictly in request order.

The reader never waits for a reply: it queues a *pending reply* for every
request (bounded by ``pipeline_depth``) and goes on parsing, so a pipelined
client keeps the topic's group commit fed.  The writer coalesces replies that
are ready into one ``send`` and streams READ replies from the partition files
with ``os.sendfile``.  A READ/TAIL with nothing ahead of it (no reply pending,
the writer idle) is answered by the reader itself: no hop to the writer.

Socket calls go through :mod:`logd_trio.server.sockio` (try first, wait only
when needed); the reader's waits for input are bounded by one cancel scope,
``read_scope``, whose deadline is moved per wait.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Final

import trio

from logd_trio.core import requests as p
from logd_trio.core.errors import NotFound, RequestError, StorageError
from logd_trio.server.admin import AdminRequest, peer_of, report_refusal
from logd_trio.server.auth import check_request
from logd_trio.server.reading import QueuedRead, answer_read, answer_seek, polls
from logd_trio.server.reasons import error_kind, error_reply
from logd_trio.server.registry import Registry
from logd_trio.server.replica.acks import AwaitReplicas
from logd_trio.server.replica.serving import serve_fetch
from logd_trio.server.sending import Lender, SocketIO
from logd_trio.server.stats import Counters, StatsRequest
from logd_trio.server.storage.reads import ReadPlan
from logd_trio.server.tls import Accepted, ServerSocket, plain_socket
from logd_trio.server.topic import Append

__all__ = ["Connection"]

log = logging.getLogger("logd_trio.server.connection")

RECV_START: Final = 16 * 1024
RECV_SIZE: Final = 256 * 1024
# --timeout grows with the request: each byte received adds 1/MIN_REQUEST_RATE seconds, so a large
# BATCH sent at this rate or faster is never cut off, while a trickle still is.
MIN_REQUEST_RATE: Final = 64 * 1024  # bytes/s
# Once a graceful shutdown has begun, a reply may wait this long for progress (instead of
# --timeout), so that a client that never reads does not hold the shutdown.
DRAIN_SEND_TIMEOUT: Final = 2.0
# What the reader's current wait for input is (which timeout its deadline is).
_IDLE: Final = 1
_REQUEST: Final = 2


class _Closing:
    """Writer item: send ``reply`` then close the connection."""

    __slots__ = ("reply",)

    def __init__(self, reply: bytes) -> None:
        self.reply = reply


_Item = bytes | Append | AwaitReplicas | StatsRequest | AdminRequest | QueuedRead | p.Fetch | _Closing

_CMD_NAMES: Final[dict[type, str]] = {
    p.Batch: "batch", p.Read: "read", p.Tail: "tail", p.Stats: "stats", p.Config: "config",
    p.Close: "close", p.Ping: "ping", p.Topics: "topics", p.Fetch: "fetch", p.Delete: "delete", p.Auth: "auth",
    p.Cluster: "cluster", p.Epochs: "epochs", p.Seek: "seek",
}


class Connection:
    """Serves one client socket until it closes, errs, or the server drains."""

    def __init__(self, stream: Accepted, registry: Registry,
                 stats: trio.MemorySendChannel[StatsRequest], counters: Counters,
                 on_close: Callable[[Connection], None]) -> None:
        self.sock: ServerSocket = stream.socket  # a trio socket, or TLS over one (server/tls.py)
        self._peer = plain_socket(stream.socket)  # for log lines
        self.stream = stream
        self.guard = stream.guard  # None without --auth-file
        self.registry = registry
        self.config = registry.config
        self.stats = stats
        self.counters = counters
        self.parser = p.RequestParser(max_request=self.config.batch_size,
                                      max_messages=self.config.max_messages)
        self.read_scope = trio.CancelScope()  # the reader's: stop_reading() cancels it, waits set its deadline
        self._waiting = 0  # _IDLE / _REQUEST while the reader waits for input
        self._carry = (self.config.timeout or math.inf, True)  # (budget, short) into a fresh read_scope
        self._stopping = False
        self._answering = False  # the reader is answering a READ itself (see _answer_now)
        self._writer_parked = False  # the writer waits for an item, with nothing unsent
        self.inflight = 0
        self._queued_reads: list[QueuedRead] = []  # READs / TAILs queued for the writer, not answered yet
        self._on_close = on_close
        # Set when the peer stops sending (EOF): long-polls then answer at
        # once instead of holding a connection whose client has gone.
        self._eof = False
        self._poll_scope: trio.CancelScope | None = None
        # A batch queued at its topic whose reply slot the reader could not get before it was
        # stopped (graceful shutdown): the writer answers it last, so no stored batch loses its OK.
        self._orphan: Append | None = None
        self.io = SocketIO(stream.socket, counters, self.config.timeout or math.inf)  # plaintext or TLS

    def stop_reading(self) -> None:
        """Graceful shutdown: take no new request; in-flight ones still get replies
        (a waiting long-poll answers at once, as when its wait runs out), each send
        waiting at most DRAIN_SEND_TIMEOUT for progress."""
        self._eof = True
        self._stopping = True
        if not self._answering:  # else the reader stops once its reply is sent
            self.read_scope.cancel()
        if self._poll_scope is not None:
            self._poll_scope.cancel()
        self.io.shorten(DRAIN_SEND_TIMEOUT)

    async def run(self) -> None:
        send, recv = trio.open_memory_channel[_Item](self.config.pipeline_depth)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, recv, nursery.cancel_scope)
                async with send:
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
        """Receive and dispatch until EOF, CLOSE, an ending error or ``stop_reading()``.  The waits
        for input run under ``read_scope``, its deadline set for each wait (cleared after it): when
        it fires, the idle or request timeout applies here.  The buffer is small until the peer
        fills it (a bulk sender), then RECV_SIZE: idle connections cost little memory."""
        self._view = memoryview(bytearray(RECV_START))
        while True:
            fresh = False
            with self.read_scope:
                if not (fresh := await self._receive_requests(out)):
                    return
            if self._stopping:
                return
            # data arrived just as the deadline fired, or replies are still coming (not idle): go on
            if fresh or (self._waiting == _IDLE and self.inflight):
                self.read_scope = trio.CancelScope()
                continue
            if self._waiting == _IDLE:
                log.debug("closing connection: idle")
                return
            log.debug("closing connection: a request did not arrive within --timeout")
            self.counters.error_kinds["timeout"] += 1
            self._eof = True  # a waiting long-poll answers now
            if self._poll_scope is not None:
                self._poll_scope.cancel()
            await out.send(_Closing(p.reply_err("timeout")))
            return

    async def _receive_requests(self, out: trio.MemorySendChannel[_Item]) -> bool:
        """True: the scope was cancelled (deadline, stop) as data arrived; the reader goes on afresh."""
        parser = self.parser
        counters = self.counters
        scope = self.read_scope
        idle = self.config.idle_timeout or math.inf
        timeout = self.config.timeout or math.inf
        # --timeout bounds the time spent waiting for the bytes of one request, from its
        # first byte to its last (not each wait alone: a trickle must not reset it), plus
        # 1/MIN_REQUEST_RATE s per byte of it received.  Time the reader spends waiting
        # for room in the pipeline does not count.
        budget, short = self._carry  # short: the last receive did not fill the buffer: wait first
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
                        return False
                    self.inflight += 1  # a reply ahead of later requests (the writer counts it down)
                    await out.send(error_reply(e))
                    continue
                if event is p.NEED_DATA:
                    break
                budget = timeout
                if not await self._dispatch(event, out):
                    return False
            partial = bool(parser.buffered)
            limit = max(budget, 0.0) if partial else idle
            self._waiting = _REQUEST if partial else _IDLE
            view = self._view
            if limit == math.inf:
                n = await self.io.receive(view, short)
            else:
                started = trio.current_time()
                scope.deadline = started + limit
                n = await self.io.receive(view, short)
                scope.deadline = math.inf
                if partial:
                    budget -= trio.current_time() - started
            self._waiting = 0
            budget += n / MIN_REQUEST_RATE  # the request's size buys time (reset when it is whole)
            if n == 0:
                self._eof = True
                if self._poll_scope is not None:
                    self._poll_scope.cancel()
                return False
            counters.bytes_in += n
            parser.receive_data(view[:n])
            short = n < len(view)
            if not short and n < RECV_SIZE:
                self._view = memoryview(bytearray(RECV_SIZE))
            if scope.cancel_called:  # (checked after its deadline was cleared)
                self._carry = (budget, short)
                return True

    async def _dispatch(self, req: p.Request, out: trio.MemorySendChannel[_Item]) -> bool:
        """Queue the pending reply for ``req``; False when the connection must stop reading."""
        counters = self.counters
        cmd = _CMD_NAMES[type(req)]
        counters.requests[cmd] += 1
        item: _Item
        try:
            if (answer := check_request(self.guard, req)) is not None:  # AUTH, or a refusal (server/auth.py)
                item = answer
            elif isinstance(req, p.Batch):
                self.registry.replica.refuse_writes()  # a follower: ERR not leader HOST:PORT
                # No checkpoint per batch: queue all the batches of one receive, then yield once.
                item = await self.registry.append(req.topic, req.frame, req.count,
                                                  self.guard.principal if self.guard is not None else None,
                                                  direct=not self.parser.buffered)  # (else more follow)
                for queued in self._queued_reads:  # READs ahead of it stop before it (QueuedRead)
                    if queued.after is None and queued.req.topic == req.topic:
                        queued.after = item
                if self.registry.replica.await_acks:  # the reply waits for followers, cluster (server/replica/acks.py)
                    item = AwaitReplicas(item, req.topic, self.registry.replica)
                elif self._alone() and self.config.fsync != "always":  # (else it waits for an fsync:
                    await self._answer_now(item)  # the reader must go on reading for group commit)
                    return not self._stopping
            elif isinstance(req, p.Read | p.Tail | p.Fetch):
                if self._alone() and not isinstance(req, p.Fetch) and not polls(self, req):
                    await self._answer_now(req)
                    return not self._stopping
                # Resolved by the writer, in order: a READ pipelined after a BATCH on this
                # connection sees that batch, and none sent after it (QueuedRead).
                if isinstance(req, p.Fetch):
                    item = req
                else:
                    item = QueuedRead(req)
                    if not (isinstance(req, p.Read) and req.wait_ms is not None):  # (a long-poll: QueuedRead)
                        self._queued_reads.append(item)
            elif isinstance(req, p.Seek):  # answered now: what is readable now (server/reading.py)
                item = answer_seek(self.registry, req)
            elif isinstance(req, p.Cluster | p.Epochs):  # replication extensions (server/replica/state.py)
                item = self.registry.replica.extension_reply(req)
            elif isinstance(req, p.Ping):
                item = p.REPLY_PONG
            elif isinstance(req, p.Close):
                await out.send(_Closing(p.REPLY_OK))
                return False
            elif isinstance(req, p.Delete):  # extensions answered in reply order: server/admin.py
                item = AdminRequest(req, self.registry, counters, peer_of(self._peer))
            else:
                assert not isinstance(req, p.Auth)  # answered by check_request
                item = StatsRequest(req)  # sent to the stats task by the writer, in reply order
        except (NotFound, RequestError, StorageError) as e:
            counters.errors[cmd] += 1
            counters.error_kinds[error_kind(e)] += 1
            item = error_reply(e)
            if isinstance(e, RequestError):  # a limit or rule: logged with the peer (throttled)
                report_refusal(cmd, e, self._peer)
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
        if isinstance(item, AdminRequest):  # later requests see its effect (server/admin.py)
            await item.done.wait()
        return True

    def _alone(self) -> bool:
        """Nothing ahead of the request just parsed (every earlier reply is sent) nor behind it (a
        pipelining client keeps the writer, so that parsing and sending overlap)."""
        return not (self.inflight or self.parser.buffered) and self._writer_parked

    async def _answer_now(self, req: p.Read | p.Tail | Append) -> None:
        """Answer on the reader's task (no hop to the writer).  ``stop_reading()`` meanwhile lets
        the reply finish (its sends then wait at most DRAIN_SEND_TIMEOUT) and stops the reader after."""
        self._answering = True
        try:
            pending = bytearray()
            if isinstance(req, Append):
                if not req.done.is_set():  # (set already when appended at once: Topic.append_now)
                    await req.done.wait()  # the topic task answers once it is stored
                pending += self._batch_reply(req)
            else:
                await answer_read(self, req, pending)
            if pending:
                await self._send_all(pending)
        finally:
            self._answering = False

    def _batch_reply(self, item: Append) -> bytes:
        if item.error is None:
            return b"OK %d 1\r\n" % item.offset
        self.counters.errors["batch"] += 1
        self.counters.error_kinds[error_kind(item.error)] += 1
        return error_reply(item.error)

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
                        self._writer_parked = True
                        try:
                            item = await items.receive()
                        except trio.EndOfChannel:
                            if self._orphan is None:
                                break
                            item, self._orphan = self._orphan, None
                        finally:
                            self._writer_parked = False
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
                        pending += self._batch_reply(item)
                    elif isinstance(item, AwaitReplicas):
                        if not item.ready and pending:
                            await self._send_all(pending)
                            pending.clear()
                        pending += await item.answer(error_reply)
                    elif isinstance(item, QueuedRead):
                        if self._queued_reads and self._queued_reads[0] is item:  # (the oldest tracked)
                            self._queued_reads.pop(0)
                        await answer_read(self, item.req, pending, item.upto)
                    elif isinstance(item, p.Fetch):  # replication (server/replica/serving.py)
                        if (e := await serve_fetch(self, item, pending)) is not None:
                            pending += error_reply(e)
                    elif isinstance(item, AdminRequest):
                        if pending:
                            await self._send_all(pending)
                            pending.clear()
                        pending += await item.answer()
                    elif isinstance(item, StatsRequest):
                        await self.stats.send(item)
                        await item.done.wait()
                        pending += item.reply
                    else:
                        pending += item.reply
                        await self._send_all(pending)
                        await self.io.linger_close()
                        scope.cancel()
                        return
                    self.inflight -= 1
                if pending:
                    await self._send_all(pending)
        finally:
            scope.cancel()

    async def _send_all(self, data: bytes | bytearray) -> None:
        await self.io.send_all(data)

    async def _send_plan(self, plan: ReadPlan, pending: bytearray, header: bytes | None = None,
                         lend: Lender | None = None) -> None:
        await self.io.send_plan(plan, pending, header, lend)
