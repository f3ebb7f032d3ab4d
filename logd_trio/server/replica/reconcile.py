"""A follower's requests for MOK replies, and its reconciliation with a new leader's history.

After a leader change (a cluster's failover) a follower asks ``EPOCHS`` and
cuts what its log holds beyond the leader's history (:func:`divergence`),
copied aside first (``.log.corrupt-*``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable

import trio

from logd_trio.core.errors import BadReply, LogdError
from logd_trio.core.replies import NEED_DATA, ErrorReply, MokReply, ReplyKind, ReplyParser
from logd_trio.server.registry import Registry
from logd_trio.server.replica.follower_log import FollowerLog, FollowerTopic
from logd_trio.server.replica.state import ReplicaState
from logd_trio.server.storage.epochs import EpochFile
from logd_trio.server.storage.replica_log import OffsetMismatch, start_at, truncate_to
from logd_trio.server.topic import Topic

__all__ = ["divergence", "reconcile"]

log = logging.getLogger("logd_trio.server.replica")

_RECV = 256 * 1024


class _Retry(LogdError):
    """The leader refused this fetch for a reason worth retrying (logged, then backoff)."""



async def _mok(stream: trio.abc.Stream, request: bytes, limit: float) -> bytes:
    """Send ``request`` (a line) and return its ``MOK`` body, within ``limit`` seconds; an ``ERR``
    is a :class:`_Retry`, anything else a :class:`BadReply`."""
    what = request.split(b" ", 1)[0].strip().decode("ascii", "replace")
    with trio.fail_after(limit):
        await stream.send_all(request)
        parser = ReplyParser(max_reply=1 << 20)
        while True:
            reply = parser.next_reply(ReplyKind.MOK)
            if isinstance(reply, MokReply):
                return reply.body
            if isinstance(reply, ErrorReply):
                raise _Retry(f"{what} refused: {reply.reason}")
            if reply is not NEED_DATA:
                raise BadReply(f"unexpected reply to {what}: {reply!r}")
            data = await stream.receive_some(_RECV)
            if not data:
                raise BadReply("the leader closed the connection")
            parser.receive_data(data)


def _start_over(flog: FollowerLog, ef: EpochFile, start: int) -> None:
    """Blocking: copy the whole log aside, empty it and make it start at ``start`` (the leader's first)."""
    truncate_to(flog, flog.first)
    ef.truncate(0)
    start_at(flog, start)


def _truncate(flog: FollowerLog, ef: EpochFile, end: int) -> None:
    truncate_to(flog, end)
    ef.truncate(end)


async def _cut(state: ReplicaState, topic: Topic, truncate: Callable[[], object]) -> None:
    """Cut with no append of this node's last leadership pending (FollowerTopic.cut)."""
    assert isinstance(topic, FollowerTopic)
    await topic.cut(truncate)
    state.marks.cut(topic.name, topic.log.head)


async def _epochs(stream: trio.abc.Stream, name: str, limit: float) -> dict[str, object]:
    raw = await _mok(stream, b"EPOCHS %s\r\n" % name.encode(), limit)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BadReply(f"EPOCHS: not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadReply("EPOCHS: expected an object")
    return body


def divergence(mine: list[tuple[int, int]], theirs: list[tuple[int, int]], their_head: int) -> int | None:
    """Where this log stops matching the leader's (None: nowhere we know of), by the leader-epoch rule
    (as in Kafka): take the newest leader epoch E not above this log's newest; this log matches up to
    where E ends on the leader, and at most up to where this log's own next epoch after E starts.
    Cut there and look again, until nothing changes."""
    if not mine:
        return None
    cut: int | None = None
    while mine:
        latest = mine[-1][0]
        shared: int | None = None  # E: the leader's newest epoch not above ours (None: all are newer)
        end = theirs[0][1] if theirs else their_head
        for i, (e, _) in enumerate(theirs):
            if e <= latest:
                shared, end = e, theirs[i + 1][1] if i + 1 < len(theirs) else their_head
        own_next = next((s for e, s in mine if shared is None or e > shared), None)
        if own_next is not None:
            end = min(end, own_next)
        cut = end if cut is None else min(cut, end)
        kept = [(e, s) for e, s in mine if s < cut]
        if kept == mine:
            break
        mine = kept
    return cut


async def reconcile(stream: trio.abc.Stream, registry: Registry, topic: Topic, limit: float) -> None:
    """After a leader change: cut what this log holds beyond the new leader's history (copied aside,
    ``.log.corrupt-*``): a tail no in-sync set acknowledged, written by a leader that lost its place."""
    flog = topic.log
    assert isinstance(flog, FollowerLog)
    ef = registry.replica.epochs[topic.name]
    for _ in range(4):
        body = await _epochs(stream, topic.name, limit)
        raw, head = body.get("epochs"), body.get("head")
        if not isinstance(raw, list) or not isinstance(head, int):
            raise BadReply("EPOCHS: expected epochs and head")
        try:
            theirs = [(int(e), int(s)) for e, s in raw]
        except (TypeError, ValueError, OverflowError):
            raise BadReply(f"EPOCHS: expected [epoch, start] pairs, got {raw[:3]!r}") from None
        end = divergence(ef.entries, theirs, head)
        if end is None or end >= flog.head:
            return
        log.warning("topic %s: this node's log (to %d, epoch %d) goes beyond the leader's history (epoch %d ends "
                    "at %d there): the rest is copied aside (.log.corrupt-*) and cut", topic.name, flog.head,
                    ef.latest, ef.epoch_at(end) if end > flog.first else 0, end)
        try:
            if end < flog.first:
                raise OffsetMismatch(f"offset {end} before the log's first {flog.first}")
            await _cut(registry.replica, topic, functools.partial(_truncate, flog, ef, end))
        except OffsetMismatch as e:
            log.warning("topic %s: cannot cut at %d (%s): the whole log is copied aside", topic.name, end, e)
            await _cut(registry.replica, topic, functools.partial(_start_over, flog, ef, max(end, 0)))
