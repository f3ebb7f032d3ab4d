"""One client connection on a worker process: READ/TAIL answered here, the rest relayed.

The reader parses the client's requests.  A READ or TAIL the worker's view can
answer (:mod:`.view`: below the published head) is answered by the reader
itself, by ``sendfile`` as the owner does; every other request is written,
byte for byte as received, to this connection's own Unix-socket connection to
the owner (opened on first use), which serves it with its ordinary connection
code.  A forwarder task copies the owner's replies back, counting them off
(:mod:`.replies`).  Order: a reply of the worker's own waits until every
relayed reply before it was forwarded, so replies keep request order, and a
READ after a relayed BATCH is planned only once that BATCH's OK came back (the
owner publishes the head before it sends an OK), so it sees it; a request after a
relayed READ is relayed only once that READ was answered, so the READ never sees it.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Final, Protocol

import trio

from logd_trio.core import requests as p
from logd_trio.core.errors import NotFound, RequestError
from logd_trio.core.framing import parse_uint
from logd_trio.server.config import ServerConfig
from logd_trio.server.reasons import error_reply
from logd_trio.server.sending import SocketIO
from logd_trio.server.stats import Counters
from logd_trio.server.workers.heads import HeadTable
from logd_trio.server.workers.replies import ReplySplitter
from logd_trio.server.workers.view import Relay, Views

__all__ = ["PREAMBLE_SIZE", "Session", "WorkerContext"]

log = logging.getLogger("logd_trio.server.workers.session")

RECV_SIZE: Final = 256 * 1024
UP_RECV: Final = 256 * 1024
PREAMBLE_SIZE: Final = 64  # the client's address, padded: the first bytes on an upstream connection
CONNECT_TIMEOUT: Final = 5.0
UNREACHABLE: Final = p.reply_err("unavailable: this worker process cannot reach the server now")
FETCH_REFUSED: Final = p.reply_err("not supported: FETCH on a worker process (replicate from a server "
                                   "without --workers)")


class WorkerContext(Protocol):
    """What a session needs of its worker process."""

    config: ServerConfig
    counters: Counters
    heads: HeadTable
    views: Views
    upstream_path: str


class Session:
    """Serves one client socket until it closes, errs, idles out or the worker stops."""

    def __init__(self, sock: trio.socket.SocketType, address: str, ctx: WorkerContext) -> None:
        self.sock = sock
        self.address = address
        self.ctx = ctx
        config = ctx.config
        self.config = config
        self.io = SocketIO(sock, ctx.counters, config.timeout or math.inf)
        self.parser = p.RequestParser(max_request=config.batch_size, max_messages=config.max_messages)
        self.raw = bytearray()  # received, not yet answered or relayed (requests are split in _split)
        self.up: trio.socket.SocketType | None = None
        self.owed: collections.deque[bool] = collections.deque()  # replies the owner owes (True: a READ's)
        self._reads_owed = 0  # how many of them are READs' (or TAILs')
        self._drained = trio.Event()
        self._drained.set()
        self._scope = trio.CancelScope()  # the reader's waits for input
        self._stopping = False
        self._receiving = False  # the reader waits for input (stop() may cancel that wait)
        self._nursery: trio.Nursery | None = None
        # the bound on a relayed reply's wait for progress: a long-poll may wait max_wait
        self.up_timeout = config.max_wait + (config.timeout or 15.0) + 1.0

    def stop(self) -> None:
        """The worker is stopping: take no new request (replies owed are still forwarded)."""
        self._stopping = True
        if self._receiving:  # else the reader stops once the request in hand is answered or relayed
            self._scope.cancel()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._reader()
                    with trio.move_on_after(self.config.shutdown_timeout):
                        await self._drained.wait()
                finally:
                    nursery.cancel_scope.cancel()
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as eg:
            log.debug("connection ended: %r", eg.exceptions[0])
        except* Exception as eg:  # a bug must cost one connection, never the worker
            log.error("connection closed after an internal error", exc_info=eg.exceptions[0])
        finally:
            if self.up is not None:
                self.up.close()
            self.sock.close()

    # ------------------------------------------------------------ reader

    async def _reader(self) -> None:
        """Receive and dispatch until EOF, CLOSE, an ending error, a timeout or :meth:`stop`.  The
        waits for input run under one cancel scope whose deadline is set per wait (a fresh scope
        only after it fired)."""
        self._view = memoryview(bytearray(RECV_SIZE))
        self._started = trio.current_time()
        while True:
            with self._scope:
                if not await self._receive():
                    return
            if self._stopping:
                return
            partial = bool(self.raw)
            if not partial and self.owed:
                self._scope = trio.CancelScope()
                continue  # not idle: replies are still coming
            if partial:
                await self._local(p.reply_err("timeout"))
            return

    async def _receive(self) -> bool:
        """False: the connection ends; True: the scope fired (a timeout or a stop)."""
        raw, scope = self.raw, self._scope
        idle = self.config.idle_timeout or math.inf
        timeout = self.config.timeout or math.inf
        while True:
            while True:
                try:
                    event, k = self._split()
                except RequestError as e:  # one that closes the connection
                    await self._local(error_reply(e))
                    await self.io.linger_close()
                    return False
                if event is p.NEED_DATA:
                    break
                if not await self._dispatch(event, raw, k) or self._stopping:
                    return False
                del raw[:k]
                self._started = trio.current_time()
            partial = bool(raw)
            limit = timeout - (trio.current_time() - self._started) if partial else idle
            if limit != math.inf:
                scope.deadline = trio.current_time() + max(limit, 0.0)
            self._receiving = True
            try:
                n = await self.io.receive(self._view, not partial)  # the rest of a request: try first
            finally:
                self._receiving = False
            scope.deadline = math.inf
            if n == 0:
                return False
            if not partial:
                self._started = trio.current_time()
            raw += self._view[:n]

    def _split(self) -> tuple[p.Request | p.NeedData | None, int]:
        """The next request at the start of ``raw`` and its length in bytes (NEED_DATA: incomplete).

        A BATCH whose line is valid is returned as None once whole, its body unchecked: it is
        relayed and the owner checks it.  Any other line goes through the request parser (its
        closing errors raised; for the others the line is relayed), so it is judged exactly as the
        owner judges it."""
        raw = self.raw
        nl = raw.find(b"\n", 0, p.MAX_LINE)
        if nl < 0:
            if len(raw) >= p.MAX_LINE:
                self.parser.receive_data(raw[:p.MAX_LINE])
                self.parser.next_event()  # raises: request line too long
            return p.NEED_DATA, 0
        if raw.startswith(b"BATCH ") and raw[nl - 1] == 0x0D:
            words = bytes(raw[:nl - 1]).split(b" ")
            size = parse_uint(words[1]) if len(words) == 5 else None
            if size is not None and nl + 1 + size <= self.config.batch_size:
                return (p.NEED_DATA, 0) if len(raw) < nl + 1 + size else (None, nl + 1 + size)
        self.parser.receive_data(raw[:nl + 1])
        try:
            event = self.parser.next_event()
        except RequestError as e:
            if e.close:
                raise
            return None, nl + 1  # relayed verbatim: the owner's parser gives the same error
        if event is p.NEED_DATA:  # a whole line always parses (a BATCH's was handled above)
            raise RequestError(p.INVALID_REQUEST, close=True)
        return event, nl + 1

    async def _dispatch(self, req: p.Request | None, raw: bytearray, k: int) -> bool:
        """Answer or relay one request (None: a BATCH, or a line the owner refuses); False when the
        connection must end."""
        if isinstance(req, p.Read | p.Tail):
            if await self._read(req):
                return True
        elif isinstance(req, p.Ping):
            await self._local(p.REPLY_PONG)
            return True
        elif isinstance(req, p.Close):
            await self._local(p.REPLY_OK)
            await self.io.linger_close()
            return False
        elif isinstance(req, p.Fetch):
            await self._local(FETCH_REFUSED)
            return True
        read = isinstance(req, p.Read | p.Tail)
        if not read and self._reads_owed:  # it must not take effect before a READ ahead is planned
            await self._wait_drained()
        return await self._relay(bytes(raw[:k]), read)

    async def _read(self, req: p.Read | p.Tail) -> bool:
        """Answer from the files; False: the owner must (relay)."""
        ctx = self.ctx
        if self.owed:  # a READ sees the BATCHes before it: wait for their replies first
            await self._wait_drained()
        pub = ctx.heads.read(req.topic)
        if pub is None:
            if not ctx.heads.unstable:  # no slot (deleted, unknown); unstable: relay once, keep the view
                ctx.views.drop(req.topic)
            return False
        offset = req.offset if isinstance(req, p.Read) else pub.first
        try:
            plan = ctx.views.get(req.topic).plan(pub, offset, req.limit)
        except Relay:
            return False
        except NotFound as e:
            await self.io.send_all(error_reply(e))
            return True
        ctx.counters.requests["read" if isinstance(req, p.Read) else "tail"] += 1
        await self.io.send_plan(plan, bytearray())
        return True

    async def _local(self, reply: bytes) -> None:
        await self._wait_drained()
        await self.io.send_all(reply)

    async def _wait_drained(self) -> None:
        if self.owed:
            with trio.fail_after(self.up_timeout):
                await self._drained.wait()

    # ------------------------------------------------------------ relay

    async def _relay(self, data: bytes, read: bool) -> bool:
        """False: the owner cannot be reached (answered with one ERR line; the connection ends)."""
        if self.up is None:
            try:
                await self._open_upstream()
            except (OSError, trio.TooSlowError) as e:
                log.warning("connection from %s: cannot reach the server process: %s", self.address,
                            getattr(e, "strerror", None) or type(e).__name__)
                await self._local(UNREACHABLE)
                await self.io.linger_close()
                return False
        assert self.up is not None
        self.owed.append(read)
        self._reads_owed += read
        if self._drained.is_set():
            self._drained = trio.Event()
        view = memoryview(data)
        with trio.fail_after(self.up_timeout):
            while view:
                n = await self.up.send(view)
                view = view[n:]
        return True

    async def _open_upstream(self) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await sock.connect(self.ctx.upstream_path)
                await sock.send(self.address.encode("ascii", "replace")[:PREAMBLE_SIZE - 1].ljust(
                    PREAMBLE_SIZE - 1) + b"\n")
        except BaseException:
            sock.close()
            raise
        self.up = sock
        assert self._nursery is not None
        self._nursery.start_soon(self._forward, sock)

    async def _forward(self, up: trio.socket.SocketType) -> None:
        """Copy the owner's replies to the client, counting them off; ends at the owner's EOF
        (the next relay opens a new connection) or when the session ends."""
        splitter = ReplySplitter()
        buf = bytearray(UP_RECV)
        view = memoryview(buf)
        idle = (self.config.idle_timeout or math.inf) / 2
        while True:
            if self.owed:
                with trio.fail_after(self.up_timeout):
                    n = await up.recv_into(buf)
            else:  # closed by us well before the owner's idle timeout would (no race with a relay)
                with trio.move_on_after(idle) as waited:
                    n = await up.recv_into(buf)
                if waited.cancelled_caught:
                    if self.owed:
                        continue
                    n = 0
            if n == 0:
                if self.owed:
                    raise trio.BrokenResourceError("the owner closed the relay with replies owed")
                if self.up is up:
                    self.up = None
                up.close()
                return
            data = view[:n]
            done = splitter.feed(data, self.owed)
            if done < 0:
                raise trio.BrokenResourceError("the owner sent more than the replies owed")
            await self.io.send_all(data)
            for _ in range(done):
                self._reads_owed -= self.owed.popleft()
            if not self.owed:
                self._drained.set()
