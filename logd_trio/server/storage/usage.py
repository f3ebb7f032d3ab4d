"""What a topic's files hold, for STATS and ``logd topics --json``: batches and the last append.

Synchronous and cheap (no file is read: index records are counted and the time
is taken from what the partitions know), so the stats task calls it on the Trio
thread.
"""

from __future__ import annotations

from logd_trio.server.storage.topic_log import TopicLog

__all__ = ["batches", "last_write"]


def batches(tlog: TopicLog) -> int:
    """Batches in the retained partitions (acknowledged or not)."""
    return sum(len(p.idx) for p in tlog._parts)  # the log's own partitions, only read


def last_write(tlog: TopicLog) -> float:
    """Unix time of the topic's last append (its index's time; for a partition indexed by an older
    release, the last write to its data file); 0.0: none, or the log is closed."""
    return tlog.last_append_ms / 1000
