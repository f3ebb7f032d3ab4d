"""A worker's read-only view of the topics' partition files, bounded by the published heads.

Synchronous file code, no trio.  For each topic the worker opens the
``<start>.log`` / ``<start>.index`` pairs read-only and plans READs with the
owner's own planner (:func:`~logd_trio.server.storage.reads.plan_read`), never
past the published head.  Index records are trusted only as far as the
published head: the owner writes every record of a batch before it publishes
that batch, so the records up to the head are whole; what lies beyond (being
written) is never looked at.  Anything the view cannot answer for sure returns
None and the worker relays the request to the owner, which answers it as it
always does: a topic without a slot, an offset at or past the head (the owner
knows more, or the answer is its long-poll), an offset before ``base``
(frames of an earlier process, which the owner verifies before serving), an
index that does not reach the head, any I/O error.
"""

from __future__ import annotations

import contextlib
import os
from bisect import bisect_right
from operator import attrgetter
from pathlib import Path
from typing import Final

from logd_trio.core.errors import NotFound, StorageError
from logd_trio.server.storage.files import O_CLOEXEC, close_quietly, index_path, log_path, parse_start
from logd_trio.server.storage.index import REC, PartitionIndex, read_layout
from logd_trio.server.storage.partition import Partition
from logd_trio.server.storage.reads import ReadPlan, plan_read
from logd_trio.server.workers.heads import HeadTable, Published

__all__ = ["Relay", "TopicView", "Views"]

MAX_VIEWS: Final = 4096  # topics whose files one worker keeps open (the least recently used go first)


class Relay(Exception):
    """The view cannot answer this for sure: relay the request to the owner."""


class TopicView:
    """One topic's partitions as of generation ``gen`` (high 32 bits: the topic's incarnation;
    low: its partition-list changes)."""

    def __init__(self, root: Path, topic: str) -> None:
        self.directory = root / topic
        self.topic = topic
        self.gen = 0
        self.parts: list[Partition] = []
        self._covered = 0  # the head the indexes were extended to

    def close(self) -> None:
        for p in self.parts:
            p.close()
        self.parts = []
        self.gen = 0

    def reload(self, gen: int, first: int) -> None:
        """List the partition files again (a rotation, retention or a new incarnation of the topic);
        those wholly below ``first`` are left to be removed (never opened or kept)."""
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            raise Relay from e
        starts = sorted(s for n in names if (s := parse_start(n, ".log")) is not None)
        starts = [s for s, nxt in zip(starts, [*starts[1:], None], strict=True) if nxt is None or nxt > first]
        if gen >> 32 != self.gen >> 32:  # another incarnation of the topic (DELETE, then a new BATCH)
            self.close()
        kept = {p.start: p for p in self.parts}
        parts: list[Partition] = []
        try:
            for s in starts:
                p = kept.get(s)  # (still in kept if the stat fails: closed below)
                if p is not None and os.stat(index_path(self.directory, s)).st_ino != os.fstat(p.idx.fd).st_ino:
                    p.close()  # the owner rebuilt this index: the new file, from its first record
                    p = None
                kept.pop(s, None)
                parts.append(p if p is not None else _open(self.directory, s))
        except OSError as e:
            for p in [*parts, *kept.values()]:
                p.close()
            self.parts, self.gen, self._covered = [], 0, 0
            raise Relay from e
        for p in kept.values():
            p.close()
        self.parts, self.gen = parts, gen
        self._covered = 0

    def _cover(self, head: int) -> None:
        """Extend the indexes of the partitions before ``head`` to exactly ``head``."""
        parts = self.parts
        for j, p in enumerate(parts):
            if p.start >= head:
                break
            end = min(head, parts[j + 1].start) if j + 1 < len(parts) else head
            if p.start + p.idx.file_end < end:
                _extend(p, end - p.start)
        self._covered = head

    def plan(self, pub: Published, offset: int, limit: int) -> ReadPlan:
        """A borrowed plan (see :meth:`ReadPlan.own`) of the batches from ``offset``, never past the
        published head.  Raises :class:`NotFound` as the owner would, :class:`Relay` otherwise."""
        if offset < pub.first:
            raise NotFound(f"offset {offset} not in [{pub.first}, {pub.head})")
        if offset < pub.base or offset >= pub.head:
            raise Relay
        if pub.gen != self.gen:
            self.reload(pub.gen, pub.first)
        try:
            if pub.head > self._covered:
                self._cover(pub.head)
            j = bisect_right(self.parts, offset, key=attrgetter("start")) - 1
            if j < 0:
                raise Relay
            return plan_read(self.parts, j, offset, limit, pub.head, self.topic, None, True)
        except (OSError, StorageError) as e:  # IndexSuspect, CorruptData, I/O: the owner decides
            self._covered = 0
            raise Relay from e


def _open(directory: Path, start: int) -> Partition:
    fd = os.open(log_path(directory, start), os.O_RDONLY | O_CLOEXEC)
    try:
        ifd = os.open(index_path(directory, start), os.O_RDONLY | O_CLOEXEC)
    except OSError:
        os.close(fd)
        raise
    try:
        timed, _ = read_layout(ifd, os.fstat(ifd).st_size)
        idx = PartitionIndex(ifd, 0, timed=timed)
    except BaseException:
        close_quietly([fd, ifd])
        raise
    return Partition(start, fd, idx, 0, 0)


def _extend(p: Partition, end: int) -> None:
    """Trust ``p``'s index records up to the one that ends at position ``end`` (a published batch
    boundary); raise :class:`Relay` if the records do not reach it exactly.

    The owner writes every record of a batch before it publishes it, so the records up to
    ``end`` are whole and their ends increase: the one ending at ``end`` is found by bisection
    (a few small preads however long the index), then checked against its predecessor and the
    last record already trusted; a record being written beyond it is never trusted."""
    idx = p.idx
    rs, n = idx.rs, idx.n_file
    avail = (os.fstat(idx.fd).st_size - idx.base) // rs
    if avail <= n:
        raise Relay

    def rec(k: int) -> tuple[int, int]:  # record k (k >= n); k == n - 1: the last trusted one
        if k < n:
            return idx.file_end, idx.file_cum
        data = os.pread(idx.fd, rs, idx.base + k * rs)
        if len(data) < rs:
            raise Relay
        e, c = REC.unpack_from(data)
        return int(e), int(c)

    lo, hi = n, avail - 1  # the first record whose end is at least ``end``
    while lo < hi:
        mid = (lo + hi) // 2
        if rec(mid)[0] < end:
            lo = mid + 1
        else:
            hi = mid
    e, c = rec(lo)
    prev_end, prev_cum = rec(lo - 1)
    if e != end or prev_end >= end or c <= prev_cum or lo + 1 - n > c - idx.file_cum:
        raise Relay  # (each batch holds at least one message: the cumulative count grows by one or more)
    idx.reset(lo + 1)
    p.size, p.cum = e, c


class Views:
    """The worker's open topic views."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._views: dict[str, TopicView] = {}

    def get(self, topic: str) -> TopicView:
        view = self._views.pop(topic, None)
        if view is None:
            if len(self._views) >= MAX_VIEWS:
                oldest = next(iter(self._views))
                self._views.pop(oldest).close()
            view = TopicView(self.root, topic)
        self._views[topic] = view  # most recently used last
        return view

    def refresh(self, heads: HeadTable) -> None:
        """Reload the views whose topic's partition list changed, close those of topics gone."""
        for topic, view in list(self._views.items()):
            pub = heads.read(topic)
            if pub is None:
                if not heads.unstable:
                    self.drop(topic)
            elif pub.gen != view.gen and view.gen:
                try:
                    view.reload(pub.gen, pub.first)
                except Relay:
                    self.drop(topic)

    def drop(self, topic: str) -> None:
        """The topic has no slot (deleted): close its files."""
        view = self._views.pop(topic, None)
        if view is not None:
            view.close()

    def close(self) -> None:
        for view in self._views.values():
            with contextlib.suppress(OSError):
                view.close()
        self._views.clear()
