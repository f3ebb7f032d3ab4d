"""What a topic's files hold, for STATS and ``logd topics --json``: batches and the last write.

Synchronous and cheap (no file is read: index records are counted from what the
partitions know, the time comes from one ``fstat`` of an open descriptor), so
the stats task calls it on the Trio thread.
"""

from __future__ import annotations

import os

from logd_trio.server.storage.topic_log import TopicLog

__all__ = ["batches", "last_write"]


def batches(tlog: TopicLog) -> int:
    """Batches in the retained partitions (acknowledged or not)."""
    return sum(len(p.idx) for p in tlog._parts)  # the log's own partitions, only read


def last_write(tlog: TopicLog) -> float:
    """Unix time of the last write to the head partition's data file (0.0: none, or it is closed)."""
    parts = tlog._parts
    if not parts or not parts[-1].size:
        return 0.0
    try:
        return os.fstat(parts[-1].fd).st_mtime
    except OSError:
        return 0.0
