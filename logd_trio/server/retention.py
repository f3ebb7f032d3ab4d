"""Retention by age (``--retention-time``): one task per topic drops the partitions grown too old.

A partition goes when its newest batch is older than the limit, by the same
rules as retention by size (:meth:`TopicLog.expire`): never the head partition,
never a batch not yet acknowledged.  The task sleeps until the oldest sealed
partition is due (Trio's clock: virtual in tests, with the wall clock of
:mod:`logd_trio.server.wallclock` mapped to it), never longer than a minute (a
wall clock stepped forward is seen within it), and runs once at start, so
partitions that aged while the server was down go at once.  A due partition
waiting for its acknowledgement (an fsync; forever on a topic a failed fsync
stopped) is looked at again after a wait that doubles up to that minute.

While ``follows()`` (a replication follower: the leader decides what its copy
keeps) the task drops nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from logd_trio.server.storage.topic_log import TopicLog
from logd_trio.server.wallclock import now_ms

__all__ = ["expire_by_age"]

# Longest sleep while only the head partition exists (a rotation may seal one meanwhile).
IDLE_CHECK: Final = 60.0
# Shortest sleep: a due partition waiting for its acknowledgement (an fsync) is looked at again after it.
MIN_WAIT: Final = 0.05


async def expire_by_age(tlog: TopicLog, max_age: float, on_dropped: Callable[[], None],
                        follows: Callable[[], bool] = lambda: False) -> None:
    """Forever (the topic's nursery owns it): drop what is older than ``max_age`` seconds; call
    ``on_dropped`` when partitions left the log (their files are for the remover to unlink)."""
    max_age_ms = max(int(max_age * 1000), 1)
    longest = min(IDLE_CHECK, max_age)
    backoff, acked = MIN_WAIT, -1
    while True:
        if follows():
            await trio.sleep(longest)
            continue
        tlog.tick(now_ms())
        due = tlog.expire(max_age_ms)
        if tlog.removal_pending:
            on_dropped()
        waiting = due is not None and due <= 1 and tlog.acked == acked  # for the same acknowledgement
        backoff = min(backoff * 2, longest) if waiting else MIN_WAIT
        acked = tlog.acked
        wait = longest if due is None else min(due / 1000, longest)
        await trio.sleep(max(wait, backoff))
