"""The leader's answer to FETCH: checks, the long-poll at the end of the log, then the frames by sendfile.

Called by the connection's writer (in reply order), like READ.  A reply
never crosses an epoch boundary; the fetch offset is the follower's
acknowledgement (recorded in ``ReplicaState.followers`` once the offset is
checked: within the leader's log, on a batch boundary).
"""

from __future__ import annotations

import trio

from logd_trio.core.errors import LogdError, NotFound, RequestError, StorageError
from logd_trio.core.fetch import Fetch
from logd_trio.server.reading import ReadingConnection

__all__ = ["FetchingConnection", "serve_fetch"]


# The same face of a Connection that READ answering needs (server/reading.py).
FetchingConnection = ReadingConnection


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
            if pending:
                await conn._send_all(pending)
                pending.clear()
            conn.counters.longpoll_waiting += 1
            try:
                with state.polling(req.node, req.topic), \
                        trio.move_on_after(min(req.wait_ms / 1000, conn.config.max_wait)) as scope:
                    conn._poll_scope = scope
                    if conn._eof:
                        scope.cancel()
                    await topic.wait_for_data(req.offset, capped=False)
            finally:
                conn._poll_scope = None
                conn.counters.longpoll_waiting -= 1
            state.check_fetch(req)  # the epoch may have moved meanwhile
            visible = topic.visible_head
            header, plan = state.fetch_reply(topic.log, req, visible)
        else:
            header, plan = state.fetch_reply(topic.log, req, visible)  # validates the offset first
            if req.offset >= topic.first:
                state.record(req.node, req.topic, req.offset, visible)  # the follower's acknowledgement
        state.answered(req.node, req.topic, visible)
    except (NotFound, RequestError, StorageError) as e:
        return e
    await conn._send_plan(plan, pending, header)
    pending.clear()
    return None
