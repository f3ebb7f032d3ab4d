"""Replication on a :class:`~logd_trio.server.storage.topic_log.TopicLog`: exact appends, truncation, fetch plans.

Synchronous, no trio, owned by the log's thread like the log itself.  A
follower stores the leader's frames at the leader's offsets and starts its
partitions exactly where the leader's start, so both directories hold the
same files byte for byte.

- :func:`append_at` stores one frame at exactly ``offset`` (the head), after
  checking its CRC and framing; ``new_partition`` says the leader started a
  partition there.
- :func:`start_at` moves an empty topic's start to ``offset`` (a follower that
  joins after the leader's retention removed its oldest partitions).
- :func:`truncate_to` cuts the log back to a batch boundary; what is cut is
  copied aside first (``<start>.log.corrupt-<pos>-<time>``), never dropped.
  Blocking (copies, fsyncs, unlinks): run it in a worker thread while nothing
  appends.
- :func:`fetch_plan` (leader) plans the frames from ``offset``, up to a byte
  budget, and names the partition starts inside the range.
"""

from __future__ import annotations

import os
from pathlib import Path

from logd_trio.core.errors import NotFound, StorageError
from logd_trio.core.framing import check_frame
from logd_trio.server.storage.files import copy_aside, fsync_dir, remove_files, write_all
from logd_trio.server.storage.partition import Partition
from logd_trio.server.storage.reads import ReadPlan
from logd_trio.server.storage.syscalls import current
from logd_trio.server.storage.topic_log import TopicLog

__all__ = ["OffsetMismatch", "append_at", "fetch_plan", "start_at", "truncate_to"]


class OffsetMismatch(StorageError):
    """A replicated frame does not fit: wrong offset, bad frame, or an offset inside a batch."""


def append_at(tlog: TopicLog, offset: int, frame: bytes, *, new_partition: bool) -> int:
    """Store ``frame`` at exactly ``offset`` (page cache only, like ``TopicLog.append``); return ``offset``.

    Raises :class:`OffsetMismatch` if ``offset`` is not the head or the frame
    fails its CRC / framing check, :class:`StorageError` on a write error
    (nothing of the frame remains then).
    """
    if tlog._closed:
        raise StorageError("topic log is closed")
    if offset != tlog.head:
        raise OffsetMismatch(f"topic {tlog.topic}: frame for offset {offset}, log ends at {tlog.head}")
    h = check_frame(frame)
    if h is None or h.frame_len != len(frame):
        raise OffsetMismatch(f"topic {tlog.topic}: frame at {offset} fails its CRC or framing check")
    hp = tlog._parts[-1]
    n = len(frame)
    if new_partition and hp.size > 0:
        return tlog._append_rotate(frame, n, h.count)
    tlog._truncate_head()
    pos = hp.size
    try:
        write_all(hp.fd, frame, n, pos)
    except OSError as e:
        try:
            os.ftruncate(hp.fd, pos)
        except OSError:
            tlog._needs_truncate = True
        raise StorageError(f"topic {tlog.topic}: write failed: {e.strerror or type(e).__name__}") from e
    hp.size = pos + n
    hp.cum += h.count
    hp.idx.add(hp.size, hp.cum, tlog.now_ms)  # the follower's own append time (docs/storage.md)
    hp.newest = tlog.now_ms
    tlog.head = offset + n
    return offset


def start_at(tlog: TopicLog, offset: int) -> None:
    """Make an empty topic start at ``offset``: its only (empty) partition is replaced by ``<offset>.log``.

    The directory is fsynced by the next sync job.  Raises :class:`StorageError`
    if the topic holds data or the files cannot be created.
    """
    if tlog.head != tlog.first or len(tlog._parts) != 1 or tlog._parts[0].size:
        raise StorageError(f"topic {tlog.topic}: cannot move the start of a topic that holds data")
    if offset == tlog.head:
        return
    old = tlog._parts[0]
    try:
        p = Partition.create(tlog._dir, offset, tlog._file_mode)
    except OSError as e:
        raise StorageError(f"topic {tlog.topic}: cannot create partition {offset}: {e.strerror}") from e
    old.close()
    remove_files(old.paths(tlog._dir), tlog._log, tlog.topic)
    tlog._parts = [p]
    tlog._dir_dirty = True
    tlog.head = tlog.first = tlog.acked = offset


def truncate_to(tlog: TopicLog, offset: int) -> list[Path]:
    """Cut the log back to ``offset`` (a batch start, or the head); return the copies of what was cut.

    Everything at and after ``offset`` is copied aside (fsynced) before the
    partition is truncated (log and index) and later partitions are removed;
    then the files and the directory are fsynced.  Raises :class:`NotFound`
    outside ``[first, head]``, :class:`OffsetMismatch` inside a batch.
    """
    if offset < tlog.first or offset > tlog.head:
        raise NotFound(f"offset {offset} not in [{tlog.first}, {tlog.head}]")
    if offset == tlog.head:
        return []
    parts = tlog._parts
    j = tlog._index_of(offset)
    p = parts[j]
    pos = offset - p.start
    i = p.idx.find_start(pos)
    if i < 0:
        raise OffsetMismatch(f"topic {tlog.topic}: offset {offset} is inside a batch")
    mode = tlog._file_mode
    copies = [copy_aside(tlog._dir, p.start, p.fd, pos, p.size, mode)]
    copies += [copy_aside(tlog._dir, q.start, q.fd, 0, q.size, mode) for q in parts[j + 1:] if q.size]
    drop = parts[j + 1:]
    if pos == 0 and j > 0:  # the leader's partition boundary is not here any more
        drop = parts[j:]
    else:
        _cut(p, pos, i)
    for q in drop:
        q.close()
        remove_files(q.paths(tlog._dir), tlog._log, tlog.topic)
    del parts[len(parts) - len(drop):]
    fsync_dir(tlog._dir)
    tlog.head = offset
    tlog.acked = min(tlog.acked, offset)
    tlog._needs_truncate = False
    return copies


def _cut(p: Partition, pos: int, i: int) -> None:
    """Truncate partition ``p`` to position ``pos``, where its batch ``i`` starts (log and index, fsynced)."""
    idx = p.idx
    idx.flush()
    cum = idx.entry(i - 1)[1]
    sys = current()
    os.ftruncate(p.fd, pos)
    os.ftruncate(idx.fd, idx.base + i * idx.rs)
    sys.fsync(p.fd)
    sys.fsync(idx.fd)
    idx.hints.clear()
    idx.reset(i)
    p.size = p.synced_size = pos
    p.cum = cum
    p.vend = min(p.vend, pos)
    if pos and idx.timed:
        p.newest = idx.time(i - 1)


def fetch_plan(tlog: TopicLog, offset: int, max_bytes: int, stop: int,
               max_partitions: int | None = None) -> tuple[ReadPlan, list[int]]:
    """Whole batches from ``offset`` (about ``max_bytes``, at least one batch), never past ``stop``
    nor over ``max_partitions`` partitions (None: any number).

    Returns the plan (``segments`` on dup'ed fds: close it) and the partition
    starts in ``[offset, end)``.  ``offset == stop`` gives an empty plan.
    Raises :class:`NotFound` outside ``[first, stop]`` and
    :class:`OffsetMismatch` when ``offset`` is inside a batch.
    """
    stop = min(stop, tlog.head)
    if tlog._closed or offset < tlog.first or offset > stop:
        raise NotFound(f"offset {offset} not in [{tlog.first}, {stop}]")
    plan = ReadPlan(offset)
    starts: list[int] = []
    if offset == stop:
        return plan, starts
    parts = tlog._parts
    j = tlog._index_of(offset)
    p = parts[j]
    i = p.idx.find_start(offset - p.start)
    if i < 0:
        raise OffsetMismatch(f"offset {offset} is inside a batch")
    budget = max(max_bytes, 1)
    at = offset
    dup = current().dup
    try:
        while at < stop and budget > 0:
            if at == p.start:
                starts.append(at)
            pos = at - p.start
            limit = min(stop, p.end) - p.start
            k = p.idx.last_end_at_most(min(pos + budget, limit))
            end = p.idx.entry(k)[0] if k >= i else p.idx.entry(i)[0]  # at least one batch
            if end <= pos:
                break
            plan.segments.append((dup(p.fd), pos, end - pos))
            plan.nbytes += end - pos
            budget -= end - pos
            at = p.start + end
            if at == p.end and j + 1 < len(parts):
                if max_partitions is not None and len(plan.segments) >= max_partitions:
                    break
                j += 1
                p = parts[j]
                i = 0
            elif end < limit:
                break  # the budget ends inside this partition
    except BaseException:
        plan.close()
        raise
    return plan, starts
