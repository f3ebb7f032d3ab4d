"""A follower's topic log: every append is a replicated frame at the offset the fetcher expects.

The topic task stays the only appender and keeps its group commit: the
fetcher queues the leader's frames through the topic's ordinary inbox and
first tells the log, in order, at which offset each one must land and whether
the leader starts a partition there (:meth:`FollowerLog.expect`).  The
follower's own BATCH requests are refused before they reach the topic.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

from logd_trio.core.errors import StorageError
from logd_trio.server.storage.replica_log import OffsetMismatch, append_at, start_at
from logd_trio.server.storage.topic_log import TopicLog

__all__ = ["FollowerLog"]


class FollowerLog(TopicLog):
    """See the module docstring."""

    def __init__(self, topic: str, directory: Path, dir_fd: int, partition_size: int, partitions: int,
                 file_mode: int, logger: logging.Logger) -> None:
        super().__init__(topic, directory, dir_fd, partition_size, partitions, file_mode, logger)
        self._expected: collections.deque[tuple[int, bool, int]] = collections.deque()

    def expect(self, offset: int, new_partition: bool, first: int) -> None:
        """The next queued frame goes at ``offset``; ``first`` is the leader's first offset (an empty
        log moves its start there)."""
        self._expected.append((offset, new_partition, first))

    def forget_expectations(self) -> None:
        """After a failed reply: frames that never reached the log must not shift the next ones."""
        self._expected.clear()

    def append(self, frame: bytes | memoryview, count: int) -> int:
        q = self._expected
        if not q:
            raise StorageError(f"topic {self.topic}: this node is a follower; writes go to the leader")
        offset, new_partition, first = q.popleft()
        if self.head < offset and self.head == self.first and first == offset:
            start_at(self, offset)  # joined after the leader's retention: start where the leader does
        data = frame if isinstance(frame, bytes) else bytes(frame)
        if offset != self.head:
            q.clear()  # every later expectation is off as well
            raise OffsetMismatch(f"topic {self.topic}: frame for offset {offset}, log ends at {self.head}")
        return append_at(self, offset, data, new_partition=new_partition)
