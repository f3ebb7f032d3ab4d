"""Reading a topic message by message: ``async with client.scanner(topic) as s: async for m in s``.

Where it starts: the committed position of ``checkpoint`` if there is one
(unless ``from_beginning``), else ``start``: ``"oldest"`` (the default),
``"end"`` (follow from now), ``Last(n)`` (the last n messages) or a
``Position(offset, delta)`` (``offset=``/``delta=`` say the same; the offset
must be the start of a batch, or the head).  See :mod:`logd_trio.client.positions`.

Where it stops: after ``limit`` messages, or at the end of the log (that is
not an error: iteration simply ends; an empty or unknown topic yields
nothing).  With ``follow=True`` it waits for new data instead: with the
long-poll extension (``READ ... <wait_ms>``) on logd-trio, by polling every
``poll_interval`` seconds on a Go server.  In follow mode a lost connection
(a server restart) is retried forever with backoff, resuming at the same
position.  :class:`~logd_trio.core.errors.BadReply` (the server sent something that
is not a reply) is never retried.  A server that comes back with a shorter log
(the position past its head, or not a batch start) raises ``NotFound`` (logd-trio).
A client of several nodes (``ClusterClient``) moves to another node when its connection
breaks, and the scanner resumes there at its next offset; as that node may not serve the
position yet (its high watermark behind just after a takeover), it waits up to the client's
``settle`` seconds before it says ``NotFound``.

Reply size: one READ asks for at most ``read_size`` messages, and never more
than ``max_reply // MaxBatchSize`` (the client's reply limit over the server's
batch size from CONFIG), so a reply of full single-message batches still fits
in ``max_reply``.  A server that refuses the count (``ERR invalid request``:
its ``--max-messages`` is lower) is asked again with half as many, down to 1;
the scanner keeps the size that worked.

Retention: when the position lies before the oldest retained batch,
``on_removed="error"`` (default) raises :class:`~logd_trio.core.errors.OffsetRemoved`
and ``on_removed="earliest"`` continues at the oldest retained batch.

Checkpoints: a message counts as processed when the consumer asks for the next
one (or when iteration ends by ``limit`` / end of log).  The position after the
processed messages is committed after each reply from the server is used up
and when the block exits (shielded, at most ``close_timeout`` seconds), so a
message whose processing raised is delivered again next time (at-least-once).
:meth:`Scanner.commit` commits on demand.

Cancellation: a cancelled ``__anext__`` consumed nothing; iterating again
continues at the same message.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Literal, TypedDict

import anyio

from logd_trio.client.checkpoint import Checkpoint, Position
from logd_trio.client.positions import END, OLDEST, Last, StartAt, find_end, find_last
from logd_trio.client.transport import ClientLike, Session, check_topic
from logd_trio.core.errors import BadReply, ConnectionLost, InvalidPosition, InvalidRequest, NotFound, OffsetRemoved
from logd_trio.core.replies import ErrorReply, Message, ReadReply, ReplyKind
from logd_trio.core.requests import encode_read, encode_tail

__all__ = ["Scanner", "ScannerOptions"]

OnRemoved = Literal["error", "earliest"]


class ScannerOptions(TypedDict, total=False):
    """The keyword options of :meth:`Client.scanner` (checked by type checkers, see :class:`Scanner`)."""

    start: StartAt | None
    offset: int | None
    delta: int
    checkpoint: Checkpoint | None
    from_beginning: bool
    limit: int | None
    follow: bool
    read_size: int
    on_removed: OnRemoved
    poll_interval: float
    wait_ms: int
    close_timeout: float


class Scanner:
    """Iterates over a topic's messages.  Create with :meth:`Client.scanner`."""

    def __init__(
        self,
        client: ClientLike,
        topic: str,
        *,
        start: StartAt | None = None,
        offset: int | None = None,
        delta: int = 0,
        checkpoint: Checkpoint | None = None,
        from_beginning: bool = False,
        limit: int | None = None,
        follow: bool = False,
        read_size: int = 1000,
        on_removed: OnRemoved = "error",
        poll_interval: float = 0.5,
        wait_ms: int = 10_000,
        close_timeout: float = 5.0,
    ) -> None:
        check_topic(topic)
        if on_removed not in ("error", "earliest"):
            raise ValueError("on_removed must be 'error' or 'earliest'")
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        if not 1 <= read_size <= 50_000:
            raise ValueError("read_size must be in 1..50000")
        self._client = client
        self.topic = topic
        if start is not None and offset is not None:
            raise ValueError("give either start or offset, not both")
        self._start_at: StartAt | None = Position(offset, delta) if offset is not None else start
        self.checkpoint = checkpoint
        self.from_beginning = from_beginning
        self.limit = math.inf if limit is None else limit
        self.follow = follow
        self.read_size = read_size
        self.on_removed: OnRemoved = on_removed
        self.poll_interval = poll_interval
        self.wait_ms = wait_ms
        self.close_timeout = close_timeout
        self.count = 0
        self._session: Session | None = None
        self._fetch: Position | None = None  # next batch to read (None: oldest, unknown yet)
        self._verified = False  # is _fetch known to be a batch start or the head?
        self._started = False
        # (message, offset, delta of the position after it): positions stay
        # plain pairs on the per-message path; Position objects are made when asked for.
        self._buffer: deque[tuple[Message, int, int]] = deque()
        self._last_next: tuple[int, int] | None = None  # position after the last yielded message
        self._done: tuple[int, int] | None = None  # position after the processed messages
        self._committed: tuple[int, int] | None = None
        self._longpoll: bool | None = None
        self._ended = False
        self._sized = False  # read_size capped for max_reply yet?
        self._settle = float(getattr(client, "settle", 0.0))  # see the module docstring (a cluster)
        self._unserved: tuple[int, float] | None = None  # a position the server did not serve, since when

    # ------------------------------------------------------------ context and iteration

    async def __aenter__(self) -> Scanner:
        self._session = self._client.session()
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            with anyio.move_on_after(self.close_timeout, shield=True):
                if exc_type is None:
                    await self.commit()
                else:
                    await self._commit_done()
        finally:
            if self._session is not None:
                with anyio.CancelScope(shield=True):
                    await self._session.aclose()

    def __aiter__(self) -> Scanner:
        return self

    @property
    def position(self) -> Position | None:
        """Where a resumed consumer would start: after the messages processed so far."""
        return None if self._done is None else Position(*self._done)

    async def __anext__(self) -> Message:
        if self._last_next is not None:
            self._done = self._last_next  # the consumer asked for more: the last one is processed
        if self.count >= self.limit or self._ended:
            raise StopAsyncIteration
        while not self._buffer:
            await self._commit_done()
            if not await self._fill():
                self._ended = True
                raise StopAsyncIteration
        msg, nxt_offset, nxt_delta = self._buffer.popleft()
        self._last_next = (nxt_offset, nxt_delta)
        self.count += 1
        return msg

    async def commit(self) -> None:
        """Mark the last yielded message processed and commit the position (if a checkpoint is set)."""
        if self._last_next is not None:
            self._done = self._last_next
        await self._commit_done()

    async def _commit_done(self) -> None:
        if self.checkpoint is not None and self._done is not None and self._done != self._committed:
            done = self._done
            await self.checkpoint.commit(self.topic, Position(*done))
            self._committed = done

    # ------------------------------------------------------------ fetching

    async def _start(self) -> None:
        """Resolve where to start; ``_started`` is set only once this succeeded, so a cancelled
        or failed first ``__anext__`` resolves it again instead of reading from the oldest."""
        pos: Position | None = None
        if self.checkpoint is not None and not self.from_beginning:
            pos = await self.checkpoint.load(self.topic)
            self._committed = None if pos is None else (pos.offset, pos.delta)
        if pos is None and self._start_at is not None and self._start_at != OLDEST:
            pos = await self._resolve_start(self._start_at)
        self._fetch = pos
        self._done = None if pos is None else (pos.offset, pos.delta)
        self._started = True

    async def _cap_read_size(self) -> None:
        if not self._sized:
            # At most this many batches (each <= MaxBatchSize) fit in one reply under max_reply.
            cap = max(1, self._client.max_reply // await self._client.max_batch_size())
            self.read_size = min(self.read_size, cap)
            self._sized = True

    async def _resolve_start(self, start: StartAt) -> Position | None:
        """The position ``start`` names now (None: the oldest message)."""
        if isinstance(start, Position):
            return start
        fetch = self._fetch_for_walk
        await self._cap_read_size()
        if start == END:
            if await self._client.supports_extensions():
                head = (await self._client.topics()).get(self.topic, (0, 0))[1]
                self._verified = True
                return Position(head, 0)
            return await find_end(fetch)
        assert isinstance(start, Last)
        return await find_last(fetch, start.n)

    async def _fetch_for_walk(self, offset: int | None) -> ReadReply | ErrorReply:
        if offset is None:
            return await self._read_request(lambda n: encode_tail(self.topic, n))
        return await self._read_request(lambda n: encode_read(self.topic, offset, n))

    async def _fill(self) -> bool:
        """Read the next reply into the buffer; False at the end of the log (not in follow mode)."""
        backoff = 0.05
        while True:
            try:
                if not self._started:
                    await self._start()
                await self._cap_read_size()
                got = await self._fill_once()
            except BadReply:
                raise
            except ConnectionLost:
                if not self.follow:
                    raise
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if got or not self.follow:
                return got
            backoff = 0.05

    async def _request(self, data: bytes, extra: float = 0.0) -> ReadReply | ErrorReply:
        if self._session is None:
            raise RuntimeError("the scanner is not open: use it as 'async with client.scanner(...) as s'")
        reply = await self._session.request(data, ReplyKind.READ, extra_time=extra)
        assert isinstance(reply, ReadReply | ErrorReply)
        return reply

    async def _read_request(self, encode: Callable[[int], bytes]) -> ReadReply | ErrorReply:
        """A plain READ/TAIL of ``read_size`` messages; halves ``read_size`` while the server
        refuses the count (its ``--max-messages`` is lower) and keeps what worked."""
        while True:
            reply = await self._request(encode(self.read_size))
            if self.read_size > 1 and isinstance(reply, ErrorReply) and isinstance(reply.exception(), InvalidRequest):
                self.read_size //= 2
                continue
            return reply

    async def _oldest(self) -> int | None:
        reply = await self._request(encode_tail(self.topic, 1))
        if isinstance(reply, ErrorReply):
            exc = reply.exception()
            if isinstance(exc, NotFound):
                return None
            raise exc
        return reply.offset

    async def _use_longpoll(self) -> bool:
        if self._longpoll is None:
            self._longpoll = self.follow and await self._client.supports_extensions()
        return self._longpoll

    async def _wait_for_data(self, offset: int) -> ReadReply | None:
        """Follow mode at the (presumed) head: long-poll, or sleep before polling again."""
        if await self._use_longpoll():
            start = anyio.current_time()
            reply = await self._request(encode_read(self.topic, offset, self.read_size, self.wait_ms),
                                        extra=self.wait_ms / 1000)
            if isinstance(reply, ReadReply):
                return reply
            exc = reply.exception()
            if isinstance(exc, InvalidRequest):
                self._longpoll = False  # a server with PING but without long-poll READ
            elif not isinstance(exc, NotFound):
                raise exc
            elif anyio.current_time() - start >= self.wait_ms / 2000:
                return None
        await anyio.sleep(self.poll_interval)
        return None

    async def _fill_once(self, recheck: bool = False) -> bool:
        pos = self._fetch
        if pos is None:
            reply = await self._read_request(lambda n: encode_tail(self.topic, n))
            if isinstance(reply, ErrorReply):
                exc = reply.exception()
                if not isinstance(exc, NotFound):
                    raise exc
                if not self.follow:
                    return False
                waited = await self._wait_for_data(0)
                if waited is None:
                    return False
                reply = waited
            self._take(reply, Position(reply.offset, 0))
            return True
        reply = await self._read_request(lambda n: encode_read(self.topic, pos.offset, n))
        if isinstance(reply, ReadReply):
            self._take(reply, pos)
            return True
        exc = reply.exception()
        if not isinstance(exc, NotFound):
            raise exc
        # Not found: removed by retention, the head (no new data), or not a batch start.
        oldest = await self._oldest()
        if oldest is not None and pos.offset < oldest:
            if self.on_removed == "error":
                raise OffsetRemoved(
                    f"offset {pos.offset} of topic {self.topic!r} was removed by retention "
                    f"(oldest retained: {oldest})"
                )
            self._fetch = Position(oldest, 0)
            self._verified = True
            return await self._fill_once()
        # Following, the position is checked against the head on every empty read too: a
        # server back with a shorter log (its tail lost) would otherwise never answer it.
        if (not self._verified or self.follow) and await self._client.supports_extensions():
            head = (await self._client.topics()).get(self.topic, (0, 0))[1]  # an unknown topic's head is 0
            changed = " (the server's log is shorter than when this scanner read it)" if self._verified else ""
            if pos.offset > head:
                if await self._settling(pos):
                    return False
                raise NotFound(f"offset {pos.offset} is past the end of topic {self.topic!r} (head is {head}){changed}")
            if pos.offset != head and (oldest is not None or pos.offset != 0):
                if self._verified and not recheck:
                    return await self._fill_once(recheck=True)  # data may have come in meanwhile
                if await self._settling(pos):
                    return False
                raise NotFound(f"offset {pos.offset} is not the start of a batch in topic {self.topic!r}{changed}")
        if not self.follow:
            return False
        waited = await self._wait_for_data(pos.offset)
        if waited is None:
            return False
        self._take(waited, pos)
        return True

    async def _settling(self, pos: Position) -> bool:
        """Following a cluster: wait (a poll interval) while a position this node does not serve is
        younger than ``settle`` seconds; False once it is older (the caller raises)."""
        if not (self.follow and self._verified and self._settle > 0):
            return False
        now = anyio.current_time()
        if self._unserved is None or self._unserved[0] != pos.offset:
            self._unserved = (pos.offset, now)
        if now - self._unserved[1] >= self._settle:
            return False
        await anyio.sleep(self.poll_interval)
        return True

    def _take(self, reply: ReadReply, pos: Position) -> None:
        """Queue the reply's messages from ``pos`` on, each with the position after it."""
        self._unserved = None
        topic = self.topic
        buf = self._buffer
        for batch in reply.batches:
            off = batch.offset
            msgs = list(batch.messages())
            last = len(msgs) - 1
            if off == pos.offset and pos.delta and all(d != pos.delta for d, _ in msgs):
                raise InvalidPosition(f"position {off}:{pos.delta} of topic {topic!r} is not where a message "
                                      f"starts in the batch at offset {off} (message starts: "
                                      f"{', '.join(str(d) for d, _ in msgs[:8])}{', ...' if len(msgs) > 8 else ''})")
            for i, (delta, body) in enumerate(msgs):
                if off == pos.offset and delta < pos.delta:
                    continue
                if i < last:
                    buf.append((Message(topic, off, delta, body), off, msgs[i + 1][0]))
                else:
                    buf.append((Message(topic, off, delta, body), batch.next_offset, 0))
        self._fetch = Position(reply.next_offset, 0)
        self._verified = True
