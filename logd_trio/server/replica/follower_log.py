"""A follower's topic: every append is a replicated frame at the offset the leader gave it.

The topic task stays the only appender and keeps its group commit: the
fetcher queues the leader's frames through the topic's ordinary inbox, each
:class:`~logd_trio.server.topic.Append` carrying its own placement (the
offset it must land at, whether the leader starts a partition there, the
leader's first offset).  A frame refused before it reaches the log (a full
disk, a failed topic) therefore cannot shift the next one to its offset: the
next one fails its offset check instead.  The follower's own BATCH requests
are refused before they reach the topic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import trio

from logd_trio.core.errors import StorageError
from logd_trio.server.blocking import run_blocking
from logd_trio.server.config import ServerConfig
from logd_trio.server.storage.reads import ReadPlan
from logd_trio.server.storage.replica_log import OffsetMismatch, append_at, start_at
from logd_trio.server.storage.topic_log import TopicLog
from logd_trio.server.topic import Append, Topic

__all__ = ["FollowerLog", "FollowerTopic"]


class FollowerLog(TopicLog):
    """A topic log that takes frames only at given offsets.  Its retention is the leader's, whatever
    this node's ``--partitions``: a partition goes once the leader's first offset is past it (and not
    before), so that both directories hold the same partitions byte for byte.  While ``leads()``
    (a cluster node that leads now) its retention is its own ``--partitions``: it is the leader."""

    leader_first = 0  # the leader's first offset, as its last reply said
    leads: Callable[[], bool] = staticmethod(lambda: False)

    def _trim(self, n: int = 0) -> None:
        if self.leads():
            super()._trim(n)
            return  # (age retention, ``n``, runs only while this node leads)
        parts, upto = self._parts, min(self.acked, self.leader_first)
        while len(parts) > 1 and parts[0].end <= upto:
            self._doomed.append(parts.pop(0))
        self.first = parts[0].start

    def append(self, frame: bytes | memoryview, count: int) -> int:
        raise StorageError(f"topic {self.topic}: this node is a follower; writes go to the leader")

    def append_placed(self, frame: bytes, offset: int, new_partition: bool, first: int) -> int:
        """Store ``frame`` at exactly ``offset``; ``first`` is the leader's first offset (an empty log
        moves its start there).  Raises :class:`OffsetMismatch` when the log does not end at ``offset``."""
        if self.head < offset and self.head == self.first and first == offset:
            start_at(self, offset)  # joined after the leader's retention: start where the leader does
        if offset != self.head:
            raise OffsetMismatch(f"topic {self.topic}: frame for offset {offset}, log ends at {self.head}")
        at = append_at(self, offset, frame, new_partition=new_partition)
        self.follow_first(first)
        return at

    def follow_first(self, first: int) -> None:
        """The leader's first offset is ``first`` (any reply, with or without frames): its retention."""
        if first > self.leader_first:
            self.leader_first = first
            self._trim()


class FollowerTopic(Topic):
    """A follower's topic: items without a placement (local writes) are refused, unless ``leading()``
    says this node leads now (a cluster node's topics take both, one kind at a time)."""

    def __init__(self, name: str, flog: FollowerLog, config: ServerConfig,
                 leading: Callable[[], bool] = lambda: False) -> None:
        super().__init__(name, flog, config)
        self.flog = flog
        self.leading = flog.leads = leading
        self._fence: int | None = None  # while a cut is coming: nothing past it is acknowledged or shown

    def follows(self) -> bool:
        return not self.leading()

    async def cut(self, truncate: Callable[[], object]) -> None:
        """Run the blocking ``truncate`` (a cut of the log, in a worker thread) with no local append
        of this node's last leadership pending: those not yet answered fail (their outcome is
        unknown to the client), the fsync in flight finishes first and publishes nothing past the
        acknowledged head, then the cut runs and the acknowledged head moves to the log's new end."""
        self._fence = self.visible_head
        self._fail_beyond(self._fence)
        try:
            async with self._sync_lock:  # the syncer is not inside an fsync while the files are cut
                self._fail_beyond(self._fence)
                with trio.CancelScope(shield=True):  # a cut, once started, completes; no read or scrub meanwhile
                    await self.verifier.cuts.cut(functools.partial(self._cut_alone, truncate))
                self.visible_head = self.flog.head
        finally:
            self._fence = None

    async def _cut_alone(self, truncate: Callable[[], object]) -> None:
        # No new plan is made inside the cut gate; a lent one sends from fds the cut may close.
        await self.until_returned()
        await run_blocking(truncate)

    def follow_first(self, first: int) -> None:
        """The leader's first offset (a reply without frames too): partitions it removed go here."""
        self.flog.follow_first(first)
        if self.flog.removal_pending:
            self._garbage.set()

    async def open_read(self, offset: int, limit: int, borrow: bool = False, upto: int | None = None) -> ReadPlan:
        """As a topic's, never while the log is being cut (server/cutgate.py)."""
        return await self.verifier.cuts.use(functools.partial(super().open_read, offset, limit, borrow, upto))

    def _fail_beyond(self, fence: int) -> None:
        kept = [(end, item) for end, item in self._unacked if end <= fence]
        for end, item in self._unacked:
            if end > fence:
                item.error = item.error or StorageError(f"topic {self.name}: this node no longer leads")
                item.done.set()
        self._unacked.clear()
        self._unacked.extend(kept)

    def _ack_upto(self, upto: int) -> int:
        if self._fence is not None:
            self._fail_beyond(self._fence)
            upto = min(upto, self._fence)
        return super()._ack_upto(upto)

    def _store(self, item: Append) -> int:
        if item.place is None:
            if self.leading():
                return TopicLog.append(self.flog, item.frame, item.count)
            return self.flog.append(item.frame, item.count)  # refused
        if self.leading():
            raise StorageError(f"topic {self.name}: a replicated frame, but this node leads now")
        offset, new_partition, first = item.place
        return self.flog.append_placed(item.frame, offset, new_partition, first)
