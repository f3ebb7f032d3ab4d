"""The leader's answer to FETCH: checks, the long-poll at the end of the log, then the frames by sendfile.

Called by the connection's writer (in reply order), like READ.  A reply
never crosses an epoch boundary; the fetch offset is the follower's
acknowledgement (recorded in ``ReplicaState.followers`` once the offset is
checked: within the leader's log, on a batch boundary).  Every reply tells
the leader's high watermark; a long-poll at the head also answers (with no
frames) as soon as the high watermark moves past what the follower was last
told, so that a follower's readers are never held longer than one round trip.
A reply's further partitions draw on the server's read descriptors
(``ReadFdPool``) like a READ's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio

from logd_trio.core.errors import LogdError, NotFound, RequestError, StorageError
from logd_trio.core.fetch import Fetch, FetchHeader, encode_fetch_header
from logd_trio.server.reading import ReadingConnection
from logd_trio.server.replica.state import ReplicaState
from logd_trio.server.storage.reads import ReadPlan
from logd_trio.server.storage.replica_log import fetch_plan
from logd_trio.server.topic import Topic

__all__ = ["FetchingConnection", "fetch_reply", "serve_fetch"]


# The same face of a Connection that READ answering needs (server/reading.py).
FetchingConnection = ReadingConnection


def fetch_reply(state: ReplicaState, topic: Topic, req: Fetch, visible: int) -> tuple[bytes, ReadPlan, int]:
    """The reply header, the plan of its frames and the high watermark told (the caller records the
    acknowledgement).  ``visible`` is the topic's acknowledged head (a batch boundary).  An offset
    before the leader's first gives an empty reply (the follower moves its start there if it is
    empty).  Raises :class:`RequestError` for an offset past the head or inside a batch."""
    tlog = topic.log
    if req.offset > visible:
        raise RequestError(f"offset {req.offset} beyond the leader's head {visible}")
    ef = state.epochs.get(req.topic)
    starts: list[int] = []
    if req.offset < tlog.first:
        plan, epoch = ReadPlan(req.offset), state.epoch
    else:
        end = ef.end_of(req.offset) if ef is not None else None
        stop = visible if end is None else min(end, visible)
        epoch = ef.epoch_at(req.offset) if ef is not None else state.epoch
        max_bytes = min(req.max_bytes, state.config.fetch_max_bytes)
        try:
            plan, starts = fetch_plan(tlog, req.offset, max_bytes, stop, topic.fds.max_partitions())
        except StorageError as e:  # an offset inside a batch: the follower's log is not the leader's
            raise RequestError(str(e)) from e
        plan = topic.fds.hold(plan)
    hw = state.leader_hw(req.topic, visible, req.node, req.offset + plan.nbytes)
    header = FetchHeader(state.epoch, epoch, tlog.first, visible, req.offset, plan.nbytes, tuple(starts), hw)
    return encode_fetch_header(header), plan, hw


async def serve_fetch(conn: FetchingConnection, req: Fetch, pending: bytearray) -> LogdError | None:
    """Answer ``req`` into ``pending`` / the socket; return the error to send instead, if any."""
    registry = conn.registry
    state = registry.replica
    try:
        state.check_fetch(req)
        topic = registry.get(req.topic)
        if topic is None:
            raise RequestError(f"unknown topic {req.topic}")
        visible = topic.visible_head
        if req.offset > visible:
            raise RequestError(f"offset {req.offset} beyond the leader's head {visible}")
        if req.wait_ms and req.offset == visible and req.offset >= topic.first:
            state.record(req.node, req.topic, req.offset, visible)  # at the head: a valid acknowledgement
            if not state.hw_moved(req.node, req.topic, visible):
                if pending:
                    await conn._send_all(pending)
                    pending.clear()
                await _long_poll(conn, state, topic, req)
                state.check_fetch(req)  # the epoch may have moved meanwhile
            visible = topic.visible_head
            header, plan, hw = fetch_reply(state, topic, req, visible)
        else:
            header, plan, hw = fetch_reply(state, topic, req, visible)  # validates the offset first
            if req.offset >= topic.first:
                state.record(req.node, req.topic, req.offset, visible)  # the follower's acknowledgement
        state.answered(req.node, req.topic, visible, hw)
    except (NotFound, RequestError, StorageError) as e:
        return e
    await conn._send_plan(plan, pending, header)
    pending.clear()
    state.counters.fetch_bytes_out += plan.nbytes  # once sent: a reply cut short is not counted
    return None


async def _long_poll(conn: FetchingConnection, state: ReplicaState, topic: Topic, req: Fetch) -> None:
    """Wait for data past the follower's offset, or a high watermark it was not told yet (bounded)."""
    told = state.told_hw(req.node, req.topic)

    async def until(wait: Callable[[], Awaitable[None]], race: trio.Nursery) -> None:
        await wait()
        race.cancel_scope.cancel()

    conn.counters.longpoll_waiting += 1
    try:
        with state.polling(req.node, req.topic), \
                trio.move_on_after(min(req.wait_ms / 1000, conn.config.max_wait)) as scope:
            conn._poll_scope = scope
            if conn._eof:
                scope.cancel()
            if topic.read_cap is None or told < 0:
                await topic.wait_for_data(req.offset, capped=False)
            else:  # the readers' cap is the high watermark here
                async with trio.open_nursery() as race:
                    race.start_soon(until, partial(topic.wait_for_data, req.offset, capped=False), race)
                    race.start_soon(until, partial(topic.wait_for_data, max(told, topic.first)), race)
    finally:
        conn._poll_scope = None
        conn.counters.longpoll_waiting -= 1
