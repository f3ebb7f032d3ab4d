"""The partitions of one topic: append, rotation, retention, fsync capture, read planning.

Synchronous file code, no trio.  One :class:`TopicLog` per topic, owned by a
single thread (the topic task); the jobs it hands out (:mod:`.jobs`,
:mod:`.verify`) may run elsewhere.  Files and layout: :mod:`.files`; opening
and repair: :mod:`.recovery`; system calls that decide durability go through
:mod:`.syscalls` (the seam tests inject faults through).

Durability: :meth:`TopicLog.append` only writes to the page cache.
:meth:`TopicLog.sync_job` captures dup'ed fds of everything not yet synced;
its :meth:`SyncJob.run` fdatasyncs them (in a worker thread).

Retention: a rotation past ``partitions`` (or :meth:`TopicLog.expire`, by age)
drops the oldest partitions, only those whose batches are all acknowledged
(:meth:`TopicLog.acknowledge`), so ``first <= acknowledged head`` always; a
:class:`RemoveJob` (:meth:`TopicLog.remove_job`) unlinks them off the owning thread.

Time: a batch is recorded with ``now_ms`` (Unix ms), moved by :meth:`TopicLog.tick`
(once per wake-up of the topic task); :meth:`TopicLog.seek` finds a time (:mod:`.timeline`).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path
from types import TracebackType

from logd_trio.core.errors import NotFound, StorageError
from logd_trio.core.framing import valid_topic
from logd_trio.server.storage import rebuild, timeline, verify
from logd_trio.server.storage.files import close_quietly, log_path, open_topic_dir, write_all
from logd_trio.server.storage.index import INDEX_SYNC_BYTES, PENDING_FLUSH, IndexDamaged
from logd_trio.server.storage.jobs import FilesGone, RemoveJob, SyncJob, capture
from logd_trio.server.storage.partition import Partition
from logd_trio.server.storage.reads import ReadPlan, plan_read
from logd_trio.server.storage.rebuild import IndexSuspect, RebuildJob
from logd_trio.server.storage.recovery import Recovery
from logd_trio.server.storage.syscalls import current
from logd_trio.server.storage.verify import VerifyJob

__all__ = ["TopicLog"]


def _why(e: OSError) -> str:
    """An OSError for a reply: its reason, never a path."""
    return e.strerror or type(e).__name__


class TopicLog:
    """The partitions of one topic.  See the module docstring."""

    def __init__(self, topic: str, directory: Path, dir_fd: int, partition_size: int, partitions: int,
                 file_mode: int, logger: logging.Logger) -> None:
        self.topic = topic
        self.head = 0
        self.first = 0
        self.acked = 0  # batches before this offset are acknowledged: retention may drop them
        self.rotations = 0  # partitions created by append; a topic task may sync when it changes
        self.fsync_count = 0  # completed sync jobs (a test hook, as on_fsync)
        self.on_fsync: Callable[[int], None] | None = None  # called with a job's upto by its thread, after it
        self.now_ms = 0  # the append time of the next batches (tick)
        self._dir = directory
        self._dir_fd = dir_fd
        self._psize = partition_size
        self._pmax = partitions
        self._file_mode = file_mode
        self._log = logger
        self._parts: list[Partition] = []
        self._doomed: list[Partition] = []  # dropped by retention, files not removed yet
        self._dir_dirty = False
        self._needs_truncate = False
        self._closed = False

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, root: Path, topic: str, *, partition_size: int, partitions: int,
             file_mode: int = 0o600, dir_mode: int = 0o700,
             logger: logging.Logger | None = None, now_ms: int | None = None) -> TopicLog:
        """Create the topic dir if missing (fsync parent dir when created), recover, return.  ``now_ms``:
        the clock now (Unix ms, default the system's): the time of the first batches."""
        if not valid_topic(topic.encode("utf-8", "surrogateescape")):
            raise ValueError(f"invalid topic name {topic!r}")
        if partition_size < 1 or partitions < 1:
            raise ValueError("partition_size and partitions must be at least 1")
        log = logger if logger is not None else logging.getLogger(__name__)
        directory = Path(root) / topic
        try:
            dir_fd = open_topic_dir(Path(root), topic, dir_mode)
        except OSError as e:
            raise StorageError(f"cannot open topic directory {directory}: {e}") from e
        tl = cls(topic, directory, dir_fd, partition_size, partitions, file_mode, log)
        try:
            rec = Recovery(directory, topic, file_mode, log)
            tl._parts = rec.run()
        except BaseException:
            tl.close_without_sync()
            raise
        tl._dir_dirty = rec.dir_dirty
        tl.head = tl._parts[-1].end
        tl.first = tl._parts[0].start
        tl.acked = tl.head  # what an earlier process left counts as acknowledged
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        tl.now_ms = timeline.start_time(tl._parts, now, topic, log)
        return tl

    def tick(self, now_ms: int) -> None:
        """Batches appended from now on get ``now_ms`` (ignored if smaller: times never go back)."""
        if now_ms > self.now_ms:
            self.now_ms = now_ms

    @property
    def last_append_ms(self) -> int:  # Unix ms of the newest batch (0: none)
        return timeline.newest(self._parts)

    # ------------------------------------------------------------------ writing

    def _flush_index(self, p: Partition) -> None:
        try:
            p.idx.flush()
        except OSError as e:  # the records stay pending in memory; retried later
            self._log.warning("topic %s: cannot write index of partition %d: %s", self.topic, p.start, e)

    def _truncate_head(self) -> None:
        """Cut off what a failed write left, if an earlier attempt could not."""
        if self._needs_truncate:
            hp = self._parts[-1]
            try:
                current().ftruncate(hp.fd, hp.size)
            except OSError as e:
                raise StorageError(f"topic {self.topic}: write failed: {_why(e)}") from e
            self._needs_truncate = False

    def append(self, frame: bytes | memoryview, count: int) -> int:
        """Write one whole frame (page cache only), rotating when the partition is full; return its offset.

        On OSError nothing of the frame remains, the state is unchanged and
        :class:`StorageError` is raised (chained).
        """
        if self._closed:
            raise StorageError("topic log is closed")
        n = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        hp = self._parts[-1]
        pos = hp.size
        if pos > 0 and pos + n >= self._psize:
            return self._append_rotate(frame, n, count)
        self._truncate_head()
        try:
            write_all(hp.fd, frame, n, pos)
        except OSError as e:
            try:
                current().ftruncate(hp.fd, pos)
            except OSError:
                self._needs_truncate = True
            raise StorageError(f"topic {self.topic}: write failed: {_why(e)}") from e
        offset = self.head
        hp.size = pos + n
        hp.cum += count
        hp.newest = t = self.now_ms
        hp.idx.add(hp.size, hp.cum, t)
        self.head = offset + n
        if len(hp.idx.pending) >= PENDING_FLUSH:
            self._flush_index(hp)
        return offset

    def _append_rotate(self, frame: bytes | memoryview, n: int, count: int) -> int:
        self._truncate_head()
        old = self._parts[-1]
        self._flush_index(old)
        start = self.head
        try:
            p = Partition.create(self._dir, start, self._file_mode)
        except OSError as e:
            raise StorageError(f"topic {self.topic}: cannot create partition {start}: {_why(e)}") from e
        self._dir_dirty = True
        try:
            write_all(p.fd, frame, n, 0)
        except OSError as e:
            p.close()
            RemoveJob([], p.paths(self._dir), self.topic, self._log).run()
            raise StorageError(f"topic {self.topic}: write failed: {_why(e)}") from e
        p.size = n
        p.cum = count
        p.newest = self.now_ms
        p.idx.add(n, count, p.newest)
        self._parts.append(p)
        self.head = start + n
        self.rotations += 1
        self._log.info("topic %s: partition %d started (%d full at %d bytes)", self.topic, start, old.start, old.size)
        self._trim()
        return start

    # ------------------------------------------------------------------ retention

    def acknowledge(self, upto: int) -> None:
        """Batches ending at or before ``upto`` are acknowledged: retention may drop their partitions."""
        if upto > self.acked:
            self.acked = upto
            if len(self._parts) > self._pmax:
                self._trim()

    def _trim(self, n: int = 0) -> None:
        """Drop the ``n`` oldest partitions, then more while there are too many (acknowledged only)."""
        parts = self._parts
        self._doomed += parts[:n]
        del parts[:n]
        while len(parts) > self._pmax and parts[0].end <= self.acked:
            self._doomed.append(parts.pop(0))
        self.first = parts[0].start

    def expire(self, max_age_ms: int) -> int | None:
        """Retention by age (:func:`.timeline.droppable`; the files go with :meth:`remove_job`); the ms
        until the next partition is due (None: only the head is left)."""
        if self._closed:
            return None
        n, due = timeline.droppable(self._parts, self.now_ms, max_age_ms, self.acked)
        self._trim(n)
        return due

    def seek(self, when_ms: int, end: int | None = None) -> int:
        """Offset of the first batch appended at or after ``when_ms`` (Unix ms) before ``end`` (default
        the head), else ``end``.  Raises :class:`StorageError`."""
        try:
            return timeline.seek(self._parts, when_ms, self.head if end is None else min(end, self.head))
        except OSError as e:
            raise StorageError(f"topic {self.topic}: cannot read an index: {_why(e)}") from e

    removal_pending = property(lambda self: bool(self._doomed))

    def remove_job(self) -> RemoveJob | None:
        """The files of the partitions retention dropped (None if none); run it off the owning thread."""
        if not self._doomed:
            return None
        doomed, self._doomed = self._doomed, []
        return RemoveJob(doomed, [f for p in doomed for f in p.paths(self._dir)], self.topic, self._log)

    def removed(self) -> None:
        """A :meth:`remove_job` has run (owning thread): the next sync fsyncs the directory (marked
        only now: a sync before the unlinks would not make them durable)."""
        self._dir_dirty = True

    # ------------------------------------------------------------------ syncing

    def _synced(self, upto: int) -> None:
        self.fsync_count += 1  # one job runs at a time: no lost update across threads
        hook = self.on_fsync
        if hook is not None:
            hook(upto)

    def sync_job(self, *, final: bool = False) -> SyncJob | None:
        """Capture everything appended and not yet covered by a job (None if nothing).

        ``final`` also covers the head partition's index (which is otherwise
        synced only every ``INDEX_SYNC_BYTES``), as before closing.  Call on
        the owning thread; run the job anywhere (it owns dup'ed fds).
        """
        if self._closed:
            return None
        hp = self._parts[-1]
        data: list[Partition] = []
        index: list[Partition] = []
        for p in self._parts:
            if p.idx.pending:
                self._flush_index(p)
            if p.size > p.synced_size:
                data.append(p)
            unsynced = p.idx.n_file - p.idx.synced_n
            if unsynced > 0 and (p is not hp or final or unsynced * p.idx.rs >= INDEX_SYNC_BYTES):
                index.append(p)
        if not data and not index and not self._dir_dirty:
            return None
        job = capture(self.topic, self.head, data, index, self._dir_fd if self._dir_dirty else None,
                      [log_path(self._dir, p.start) for p in data], self._synced)
        self._dir_dirty = False
        return job

    def check_linked(self, job: SyncJob) -> None:
        """Raise :class:`FilesGone` if a file ``job`` synced was removed or replaced under the
        server while this log still holds it (retention's own removals do not count)."""
        live = {log_path(self._dir, p.start) for p in self._parts}
        for path in job.unlinked:
            if path in live:
                raise FilesGone(path)

    def sync(self) -> None:
        """Blocking: capture and run a final job, if there is anything to sync."""
        job = self.sync_job(final=True)
        if job is not None:
            job.run()
            self.check_linked(job)

    # ------------------------------------------------------------------ reading

    def _index_of(self, offset: int) -> int:
        """Index in ``_parts`` of the partition holding ``offset`` (-1 if before the first)."""
        return bisect_right(self._parts, offset, key=attrgetter("start")) - 1

    def read_plan(self, offset: int, limit: int, end: int | None = None, max_partitions: int | None = None,
                  borrow: bool = False) -> ReadPlan:
        """Batches from exactly ``offset`` while the message sum is below ``limit``; may span partitions.

        ``end`` (a batch boundary, default the head) hides the batches at and
        after it: the server passes its acknowledged head so that no reader
        sees a batch before it is durable.  Raises :class:`NotFound` unless
        ``offset`` starts a retained batch before ``end``, :class:`CorruptData`
        if that batch failed verification.  The plan owns dup'ed fds (unless ``borrow``): close it.
        """
        stop = self.head if end is None else min(end, self.head)
        if self._closed or offset < self.first or offset >= stop:
            raise NotFound(f"offset {offset} not in [{self.first}, {self.head})")
        return plan_read(self._parts, self._index_of(offset), offset, limit, stop, self.topic, max_partitions, borrow)

    # ------------------------------------------------------------------ verification

    def _part_at(self, start: int) -> Partition | None:
        j = self._index_of(start)
        if j >= 0 and self._parts[j].start == start and not self._closed:
            return self._parts[j]
        return None

    def verify_job(self, checks: Sequence[tuple[int, int, int]]) -> VerifyJob:
        """A job checking ``checks`` (``ReadPlan.checks``: batch-aligned ranges); run it anywhere.
        Raises :class:`IndexSuspect` if an index file was damaged under the server."""
        try:
            return verify.verify_job(self.topic, self._dir, self._file_mode, self._part_at, checks)
        except IndexDamaged as e:
            p = self._part_at(checks[0][0]) if checks else None
            raise IndexSuspect(checks[0][0], -1 if p is None else p.generation, str(e)) from e

    def scrub_job(self, max_bytes: int) -> VerifyJob | None:
        """The next unverified range (about ``max_bytes``, newest partition first), or None when done."""
        r = verify.scrub_range(self._parts, max_bytes)
        return None if r is None else self.verify_job([r])

    @property
    def unverified_bytes(self) -> int:
        """Bytes of earlier processes' frames not verified yet (the scrub's remaining work)."""
        return sum(b - a for p in self._parts for a, b in p.unverified())

    def apply_verification(self, job: VerifyJob) -> None:
        """Record a finished job's verified ranges (owning thread).  Raises :class:`IndexSuspect`
        if a batch disagreed with its index record: rebuild that index, then plan again."""
        verify.apply(job, self._part_at)
        for start in job.suspect:
            p = self._part_at(start)
            if p is not None:
                raise IndexSuspect(start, p.generation, "a batch disagrees with its index record")

    def rebuild_job(self, start: int, generation: int) -> RebuildJob | None:
        """A job rebuilding partition ``start``'s index from its log (None: gone, or rebuilt since
        ``generation``, or being rebuilt).  Run it anywhere; then :meth:`apply_rebuild`."""
        p = self._part_at(start)
        if p is None or p.idx.frozen or (generation >= 0 and p.generation != generation):
            return None
        return rebuild.start_job(p, self._dir, self._file_mode, self.topic, self._log)

    def apply_rebuild(self, job: RebuildJob) -> None:
        """Swap a finished rebuild in (owning thread); the partition's reads are verified by it."""
        rebuild.apply(job, self._part_at(job.start), self._dir, self._log)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Blocking: sync (data and indexes), remove what retention dropped, close all fds.  Idempotent."""
        if self._closed:
            return
        try:
            self.sync()
            job = self.remove_job()
            if job is not None:
                job.run()
                self.removed()
                self.sync()
        finally:
            self.close_without_sync()

    def close_without_sync(self) -> None:
        """Close all fds without fsync (after a final sync job ran, after an I/O error, or
        when shutdown ran out of time): what is not synced is left to recovery.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in self._parts + self._doomed:
            p.close()
        self._parts = []
        self._doomed = []
        close_quietly([self._dir_fd])

    def __enter__(self) -> TopicLog:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
