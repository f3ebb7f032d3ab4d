"""The answer to READ and TAIL (the long-poll at the head, the plan, the frames by sendfile), and SEEK's.

Called in reply order: by the connection's writer, or by its reader when nothing
is ahead of the request (``Connection._answer_now``).
"""

from __future__ import annotations

import time
from typing import Protocol

import trio

from logd_trio.core import requests as p
from logd_trio.core.errors import NotFound, StorageError
from logd_trio.server.appends import Append
from logd_trio.server.config import ServerConfig
from logd_trio.server.reasons import error_kind, error_reply
from logd_trio.server.registry import Registry
from logd_trio.server.sending import Lender
from logd_trio.server.stats import Counters
from logd_trio.server.storage.reads import ReadPlan

__all__ = ["ReadingConnection", "answer_read", "answer_seek", "polls"]


class ReadingConnection(Protocol):
    """What :func:`answer_read` needs of a :class:`~logd_trio.server.connection.Connection`."""

    registry: Registry
    config: ServerConfig
    counters: Counters
    _eof: bool
    _poll_scope: trio.CancelScope | None

    async def _send_all(self, data: bytes | bytearray) -> None: ...

    async def _send_plan(self, plan: ReadPlan, pending: bytearray, header: bytes | None = None,
                         lend: Lender | None = None) -> None: ...


def polls(conn: ReadingConnection, req: p.Read | p.Tail) -> bool:
    """``req`` is a long-poll READ that waits for data (at most max_waiters; beyond, a plain READ)."""
    if not isinstance(req, p.Read) or req.wait_ms is None:
        return False
    topic = conn.registry.get(req.topic)
    return req.offset == (topic.readable_head if topic is not None else 0) and (
        conn.counters.longpoll_waiting < conn.config.max_waiters)


def answer_seek(registry: Registry, req: p.Seek) -> bytes:
    """``OK <offset>``: the first readable batch of the topic appended at or after the time (the
    readable head if none).  Raises :class:`NotFound` (unknown topic) or :class:`StorageError`."""
    topic = registry.get(req.topic)
    if topic is None:
        raise NotFound(req.topic)
    return p.reply_seek(topic.seek(req.unix_ms))


class QueuedRead:
    """A READ/TAIL queued behind other replies.  ``after`` is the first BATCH to the same topic
    that its connection sent after it: the answer stops at that batch's offset once it is stored
    (the topic may store it before the writer gets to this READ), so a READ never shows a batch
    sent after it, while it does show every earlier one (the writer answers those first).  A
    long-poll READ is not capped (the connection does not track it): a later batch of its own
    may be what it waits for."""

    __slots__ = ("after", "req")

    def __init__(self, req: p.Read | p.Tail) -> None:
        self.req = req
        self.after: Append | None = None

    @property
    def upto(self) -> int | None:
        after = self.after
        return after.offset if after is not None and after.offset >= 0 else None


async def answer_read(conn: ReadingConnection, req: p.Read | p.Tail, pending: bytearray,
                      upto: int | None = None) -> None:
    """Answer READ/TAIL (and the long-poll READ) into ``pending`` / the socket; ``upto``: see
    :class:`QueuedRead`."""
    registry = conn.registry
    topic = registry.get(req.topic)
    if isinstance(req, p.Read) and req.wait_ms is not None and polls(conn, req):
        if pending:
            await conn._send_all(pending)
            pending.clear()
        conn.counters.longpoll_waiting += 1
        try:
            with trio.move_on_after(min(req.wait_ms / 1000, conn.config.max_wait)) as scope:
                conn._poll_scope = scope
                if conn._eof:
                    scope.cancel()
                while topic is None:
                    await registry.wait_created()
                    topic = registry.get(req.topic)
                await topic.wait_for_data(req.offset)
        finally:
            conn._poll_scope = None
            conn.counters.longpoll_waiting -= 1
    t0 = time.perf_counter()
    try:
        if topic is None:
            raise NotFound(req.topic)
        # borrowed: the partitions' own fds, no dup/close unless the send must wait (_send_plan)
        plan = await topic.open_read(req.offset if isinstance(req, p.Read) else topic.first, req.limit,
                                     borrow=True, upto=upto)
    except (NotFound, StorageError) as e:
        conn.counters.errors["read" if isinstance(req, p.Read) else "tail"] += 1
        conn.counters.error_kinds[error_kind(e)] += 1
        pending += error_reply(e)
        return
    await conn._send_plan(plan, pending, lend=topic)  # (lends its fds when they cannot be dup'ed)
    pending.clear()
    conn.counters.histograms.read_latency.observe(time.perf_counter() - t0)
