"""Topic storage: partition files, rotation, retention, recovery, fsync jobs, read plans.

Synchronous file code, no trio.  One :class:`TopicLog` per topic, owned by a
single thread (the topic task); only :meth:`SyncJob.run` may run elsewhere.

Layout (Go compatible): ``<root>/<topic>/<start>.log`` holds raw batch frames
exactly as received, named by the logical offset of its first byte.  Beside
each, logd-trio keeps ``<start>.index`` (see :mod:`logd_trio.server.storage.index`).  Go's
``<start>.idx`` files are left alone.

Durability: :meth:`TopicLog.append` only writes to the page cache.
:meth:`TopicLog.sync_job` captures dup'ed fds of everything not yet synced;
its :meth:`SyncJob.run` fdatasyncs them (in a worker thread).  Run jobs one
at a time, in capture order: a job's ``upto`` guarantee assumes the previous
jobs have completed.  If ``run`` raises (the OSError itself), treat the covered
batches as not durable (on Linux a failed fsync cannot be meaningfully retried).

Test hooks: ``TopicLog.fsync_count`` counts completed :meth:`SyncJob.run`
calls of that log, and ``TopicLog.on_fsync`` (``Callable[[int], None] | None``,
default None) is called with the job's ``upto`` from the thread that ran it,
after the fsyncs.  Module attribute ``_pwrite`` is the write primitive of
``append`` (monkeypatch it to simulate ENOSPC).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from logd_trio.core.errors import InvalidBatchError, NotFound, StorageError
from logd_trio.core.framing import count_messages, crc32, parse_frame_header, valid_topic
from logd_trio.server.storage.index import INDEX_SUFFIX, REC, REC_SIZE, PartitionIndex, validate

__all__ = ["CorruptData", "ReadPlan", "SyncJob", "TopicLog", "VerifyJob", "list_topics", "make_root"]

LOG_SUFFIX = ".log"
GO_INDEX_SUFFIX = ".idx"
CORRUPT_MARK = ".log.corrupt-"

_pwrite = os.pwrite
_SCAN_CHUNK = 1 << 20
# A rescan logs its progress every this many bytes.
_PROGRESS_BYTES = 256 << 20
# Flush pending index records to the page cache once they reach this size.
_PENDING_FLUSH = 64 * 1024
# fsync the head partition's index when this many bytes of it are unsynced.
_INDEX_SYNC_BYTES = 256 * 1024
# On open, frames in the last this-many indexed bytes of the head partition are
# re-verified (CRC + framing): the index may reach disk before the log data.
_VERIFY_TAIL = 64 * 1024
# Largest read of one verification step (a bigger single batch is read whole).
_VERIFY_CHUNK = 4 << 20
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_quietly(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _parse_start(name: str, suffix: str) -> int | None:
    """The start offset in ``<digits><suffix>`` (canonical decimal only), else None."""
    if not name.endswith(suffix):
        return None
    stem = name[: -len(suffix)]
    if not stem or not stem.isascii() or not stem.isdigit() or str(int(stem)) != stem:
        return None
    return int(stem)


def make_root(root: Path, dir_mode: int = 0o700) -> None:
    """Create the data directory (and missing parents) durably: each new entry's parent is fsynced."""
    root = Path(root)
    if root.is_dir():
        return
    make_root(root.parent, dir_mode)
    try:
        os.mkdir(root, dir_mode)
    except FileExistsError:
        return
    _fsync_dir(root.parent)


def list_topics(root: Path) -> list[str]:
    """Names of the topic directories under ``root`` (valid topic names only), sorted."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(
        n for n in names if valid_topic(n.encode("utf-8", "surrogateescape")) and (root / n).is_dir()
    )


def copy_aside(directory: Path, start: int, fd: int, a: int, b: int, file_mode: int, *,
               reuse: bool = False) -> Path:
    """Copy bytes ``[a, b)`` of partition ``<start>.log`` (open as ``fd``) to
    ``<start>.log.corrupt-<a>-<unixtime>`` beside it, fsynced with its directory
    entry, in chunks.  With ``reuse``, an existing copy of the same range (made
    by an earlier run) is returned instead of copying again."""
    prefix = f"{start}{CORRUPT_MARK}{a}-"
    if reuse:
        for name in os.listdir(directory):
            if name.startswith(prefix) and (directory / name).stat().st_size == b - a:
                return directory / name
    stamp = int(time.time())
    copy = directory / f"{prefix}{stamp}"
    suffix = 0
    while True:
        try:
            cfd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, file_mode)
            break
        except FileExistsError:
            suffix += 1
            copy = directory / f"{prefix}{stamp}.{suffix}"
    try:
        at = a
        while at < b:  # in chunks: a large damaged range is never read into memory at once
            chunk = os.pread(fd, min(_SCAN_CHUNK, b - at), at)
            if not chunk:
                raise OSError(errno.EIO, f"partition {start} shrank while copying")
            view = memoryview(chunk)
            while view:
                view = view[os.write(cfd, view) :]
            at += len(chunk)
        os.fsync(cfd)
    finally:
        os.close(cfd)
    _fsync_dir(directory)
    return copy


class SyncJob:
    """Everything appended up to ``upto`` and not yet fsynced; owns dup'ed fds.

    ``run()`` is blocking and safe to call in a worker thread while the owning
    :class:`TopicLog` keeps appending, rotating and deleting partitions.
    """

    __slots__ = ("_data_fds", "_dir_fd", "_done", "_index_fds", "_on_fsync", "_owner", "upto")

    def __init__(
        self,
        upto: int,
        data_fds: list[int],
        index_fds: list[int],
        dir_fd: int | None,
        owner: TopicLog,
    ) -> None:
        self.upto = upto
        self._data_fds = data_fds
        self._index_fds = index_fds
        self._dir_fd = dir_fd
        self._owner: TopicLog | None = owner
        self._on_fsync = owner.on_fsync
        self._done = False

    def _fds(self) -> list[int]:
        return self._data_fds + self._index_fds + ([] if self._dir_fd is None else [self._dir_fd])

    def run(self) -> None:
        """fdatasync the partitions (data, then index), fsync the dir; close the dups.

        Raises the :class:`OSError` if a sync fails (the dups are closed anyway).
        A second call does nothing.
        """
        if self._done:
            return
        self._done = True
        try:
            for fd in self._data_fds:
                os.fdatasync(fd)
            for fd in self._index_fds:
                os.fdatasync(fd)
            if self._dir_fd is not None:
                os.fsync(self._dir_fd)
        finally:
            _close_quietly(self._fds())
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.fsync_count += 1
        if self._on_fsync is not None:
            self._on_fsync(self.upto)

    def close(self) -> None:
        """Drop the job without syncing (closes the dups).  Idempotent."""
        if not self._done:
            self._done = True
            self._owner = None
            _close_quietly(self._fds())


class ReadPlan:
    """Batches to send for one READ: ``segments`` are ``(fd, position, length)`` on dup'ed fds.

    ``checks`` lists ``(partition start, position, end)`` ranges of the plan
    that were not verified (CRC + framing) since this process opened them:
    a server must not send the plan before :meth:`TopicLog.verify_job` /
    :meth:`TopicLog.apply_verification` have checked them and a new plan
    comes back without checks (see ``docs/durability.md``).
    """

    __slots__ = ("_closed", "checks", "nbatches", "nbytes", "nmessages", "offset", "segments")

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.nbatches = 0
        self.nmessages = 0
        self.nbytes = 0
        self.segments: list[tuple[int, int, int]] = []
        self.checks: list[tuple[int, int, int]] = []
        self._closed = False

    def close(self) -> None:
        """Close the dup'ed fds.  Idempotent."""
        if not self._closed:
            self._closed = True
            _close_quietly([fd for fd, _, _ in self.segments])

    def __enter__(self) -> ReadPlan:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class CorruptData(StorageError):
    """A stored batch failed its CRC or framing check; it is never served (``ERR corrupt data``)."""


class _Ranges:
    """Sorted, disjoint, merged half-open ``[a, b)`` position ranges of one partition."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.starts)

    def add(self, a: int, b: int) -> None:
        if a >= b:
            return
        i = bisect_right(self.ends, a - 1)  # first range ending at or after a (touching merges)
        j = bisect_right(self.starts, b)  # ranges [i, j) overlap or touch [a, b]
        if i < j:
            a = min(a, self.starts[i])
            b = max(b, self.ends[j - 1])
        self.starts[i:j] = [a]
        self.ends[i:j] = [b]

    def first_overlap(self, a: int, b: int) -> tuple[int, int] | None:
        """The first range that overlaps ``[a, b)``, or None."""
        i = bisect_right(self.ends, a)
        if a < b and i < len(self.starts) and self.starts[i] < b:
            return self.starts[i], self.ends[i]
        return None

    def missing(self, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of ``[a, b)`` not covered."""
        out: list[tuple[int, int]] = []
        i = bisect_right(self.ends, a)
        while a < b:
            if i >= len(self.starts) or self.starts[i] >= b:
                out.append((a, b))
                break
            if self.starts[i] > a:
                out.append((a, self.starts[i]))
            a = max(a, self.ends[i])
            i += 1
        return out


def _frame_ok(buf: bytes, s: int, e: int, count: int, topic: bytes) -> bool:
    """Whether ``buf[s:e]`` is exactly one valid frame (header, CRC, framing) of ``count`` messages of ``topic``."""
    if e > len(buf) or e <= s:
        return False
    try:
        h = parse_frame_header(buf, s)
        if h is None or h.frame_len != e - s or h.count != count or h.topic != topic:
            return False
        body = s + h.header_len
        return crc32(memoryview(buf)[body:e]) == h.crc and count_messages(buf, body, e) == count
    except InvalidBatchError:
        return False


class VerifyJob:
    """Checks stored batches against their CRC, framing and index record, off the owning thread.

    Built on the owning thread by :meth:`TopicLog.verify_job` or
    :meth:`TopicLog.scrub_job`; :meth:`run` is blocking and thread-safe (it
    owns dup'ed fds and copies of the index records); the result goes back
    with :meth:`TopicLog.apply_verification` on the owning thread.  Bad
    batches are copied aside (``<start>.log.corrupt-<pos>-<time>``) by ``run``.
    """

    __slots__ = ("_closed", "_dir", "_file_mode", "_parts", "bad", "checked", "nbytes", "topic")

    # per part: (partition start, dup'ed fd, first position, cum before it, index records)
    def __init__(self, topic: str, directory: Path, file_mode: int,
                 parts: list[tuple[int, int, int, int, bytes]]) -> None:
        self.topic = topic
        self._dir = directory
        self._file_mode = file_mode
        self._parts = parts
        self._closed = False
        self.nbytes = 0  # bytes read by run()
        self.checked: list[tuple[int, int, int]] = []  # (start, a, b): checked by run()
        self.bad: list[tuple[int, int, int, str]] = []  # (start, a, b, where the bytes were copied)

    def run(self) -> None:
        """Verify every batch; copy bad ones aside.  Raises OSError only if the log cannot be read."""
        try:
            for start, fd, pos, cum, records in self._parts:
                self._run_part(start, fd, pos, cum, records)
        finally:
            self.close()

    def _run_part(self, start: int, fd: int, pos: int, cum: int, records: bytes) -> None:
        first = pos
        topic = self.topic.encode("ascii")
        n = len(records) // REC_SIZE
        i = 0
        bad_a = -1
        while i < n:
            # one chunk: consecutive batches up to _VERIFY_CHUNK bytes (at least one batch)
            j = i
            chunk_end = pos
            while j < n:
                end = REC.unpack_from(records, j * REC_SIZE)[0]
                if j > i and end - pos > _VERIFY_CHUNK:
                    break
                chunk_end = end
                j += 1
            buf = os.pread(fd, chunk_end - pos, pos) if chunk_end > pos else b""
            self.nbytes += len(buf)
            base = pos
            for k in range(i, j):
                end, c = REC.unpack_from(records, k * REC_SIZE)
                ok = c > cum and _frame_ok(buf, pos - base, end - base, c - cum, topic)
                if not ok and bad_a < 0:
                    bad_a = pos
                elif ok and bad_a >= 0:
                    self._bad(start, bad_a, pos, fd)
                    bad_a = -1
                pos, cum = end, c
            i = j
        if bad_a >= 0:
            self._bad(start, bad_a, pos, fd)
        self.checked.append((start, first, pos))

    def _bad(self, start: int, a: int, b: int, fd: int) -> None:
        where = "(not copied)"
        try:
            where = str(copy_aside(self._dir, start, fd, a, b, self._file_mode, reuse=True))
        except OSError as e:
            where = f"(copy failed: {e})"
        self.bad.append((start, a, b, where))

    def close(self) -> None:
        """Close the dup'ed fds (``run`` does it too).  Idempotent."""
        if not self._closed:
            self._closed = True
            _close_quietly([fd for _, fd, _, _, _ in self._parts])


class _Partition:
    __slots__ = ("bad", "cum", "fd", "idx", "size", "start", "synced_size", "vend", "verified")

    def __init__(self, start: int, fd: int, idx: PartitionIndex, size: int, cum: int) -> None:
        self.start = start
        self.fd = fd  # .log, O_RDWR
        self.idx = idx
        self.size = size  # bytes of valid frames
        self.cum = cum  # messages in the partition
        self.synced_size = size  # bytes covered by a captured SyncJob
        # Frames in [0, vend) come from an earlier process and were trusted through the index:
        # they are verified (CRC + framing) before being served; ``verified`` holds what was.
        self.vend = 0
        self.verified = _Ranges()
        self.bad = _Ranges()  # batches that failed verification: never served


class TopicLog:
    """The partitions of one topic.  See the module docstring."""

    topic: str
    head: int
    first: int
    rotations: int
    fsync_count: int
    on_fsync: Callable[[int], None] | None

    def __init__(self, topic: str, directory: Path, dir_fd: int, partition_size: int, partitions: int,
                 file_mode: int, logger: logging.Logger) -> None:
        self.topic = topic
        self.head = 0
        self.first = 0
        self.rotations = 0  # partitions created by append; a topic task may sync when it changes
        self.fsync_count = 0
        self.on_fsync = None
        self._dir = directory
        self._dir_fd = dir_fd
        self._psize = partition_size
        self._pmax = partitions
        self._file_mode = file_mode
        self._log = logger
        self._parts: list[_Partition] = []
        self._starts: list[int] = []
        self._dir_dirty = False
        self._needs_truncate = False
        self._closed = False

    # ------------------------------------------------------------------ open / recovery

    @classmethod
    def open(cls, root: Path, topic: str, *, partition_size: int, partitions: int,
             file_mode: int = 0o600, dir_mode: int = 0o700,
             logger: logging.Logger | None = None) -> TopicLog:
        """Create the topic dir if missing (fsync parent dir when created), recover, return."""
        if not valid_topic(topic.encode("utf-8", "surrogateescape")):
            raise ValueError(f"invalid topic name {topic!r}")
        if partition_size < 1 or partitions < 1:
            raise ValueError("partition_size and partitions must be at least 1")
        log = logger if logger is not None else logging.getLogger(__name__)
        root = Path(root)
        directory = root / topic
        try:
            if not root.exists():
                os.makedirs(root, mode=dir_mode, exist_ok=True)
                _fsync_dir(root.parent)
            try:
                os.mkdir(directory, dir_mode)
                _fsync_dir(root)
            except FileExistsError:
                pass
            dir_fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except OSError as e:
            raise StorageError(f"cannot open topic directory {directory}: {e}") from e
        tl = cls(topic, directory, dir_fd, partition_size, partitions, file_mode, log)
        try:
            tl._recover()
        except BaseException:
            tl._close_fds()
            raise
        return tl

    def _recover(self) -> None:
        logs: list[int] = []
        indexes: set[int] = set()
        for name in os.listdir(self._dir):
            start = _parse_start(name, LOG_SUFFIX)
            if start is not None and (self._dir / name).is_file():
                logs.append(start)
                continue
            istart = _parse_start(name, INDEX_SUFFIX)
            if istart is not None:
                indexes.add(istart)
            elif _parse_start(name, GO_INDEX_SUFFIX) is None and CORRUPT_MARK not in name:
                self._log.warning("topic %s: ignoring stray file %s", self.topic, self._dir / name)
        logs.sort()
        for start in indexes.difference(logs):
            self._log.warning("topic %s: removing orphan index %s", self.topic, self._ipath(start))
            self._unlink(self._ipath(start))
        for i, start in enumerate(logs):
            last = i == len(logs) - 1
            limit = None if last else logs[i + 1] - start
            try:
                p = self._recover_partition(start, limit, head=last)
            except OSError as e:
                raise StorageError(f"topic {self.topic}: recovering {self._lpath(start)}: {e}") from e
            if p.size == 0 and not last:
                self._log.warning("topic %s: removing empty partition %s", self.topic, self._lpath(start))
                _close_quietly([p.fd])
                p.idx.close()
                self._unlink(self._lpath(start))
                self._unlink(self._ipath(start))
                self._dir_dirty = True
                continue
            self._parts.append(p)
            self._starts.append(start)
        if not self._parts:
            p = self._create_partition(0)
            self._parts.append(p)
            self._starts.append(0)
        hp = self._parts[-1]
        self.head = hp.start + hp.size
        self.first = self._parts[0].start

    def _lpath(self, start: int) -> Path:
        return self._dir / f"{start}{LOG_SUFFIX}"

    def _ipath(self, start: int) -> Path:
        return self._dir / f"{start}{INDEX_SUFFIX}"

    def _unlink(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._log.warning("topic %s: cannot remove %s: %s", self.topic, path, e)

    def _recover_partition(self, start: int, limit: int | None, *, head: bool) -> _Partition:
        lpath = self._lpath(start)
        fd = os.open(lpath, os.O_RDWR | _O_CLOEXEC)
        try:
            ifd = os.open(self._ipath(start), os.O_RDWR | os.O_CREAT | _O_CLOEXEC, self._file_mode)
        except OSError:
            os.close(fd)
            raise
        try:
            return self._recover_files(start, fd, ifd, limit, head=head)
        except BaseException:
            _close_quietly([fd, ifd])  # (no mapping exists before the partition is returned)
            raise

    def _recover_files(self, start: int, fd: int, ifd: int, limit: int | None, *, head: bool) -> _Partition:
        lpath = self._lpath(start)
        fsize = os.fstat(fd).st_size
        stop = fsize if limit is None else min(fsize, limit)
        isize = os.fstat(ifd).st_size
        n_rec, why = validate(fd, ifd, isize // REC_SIZE, stop)
        if why:
            self._log.warning("topic %s: index of %s: %s; rescanning", self.topic, lpath, why)
        elif isize % REC_SIZE:
            self._log.warning("topic %s: index of %s has a torn record; rescanning tail", self.topic, lpath)
        idx = PartitionIndex(ifd, n_rec)
        end, cum = idx.entry(n_rec - 1)
        if head and end > 0:
            # The index may have reached disk before the log data: re-verify its tail.
            k = idx.last_end_at_most(end - _VERIFY_TAIL)
            end, cum = idx.entry(k)
            n_rec = k + 1
        if n_rec * REC_SIZE != isize:
            os.ftruncate(ifd, n_rec * REC_SIZE)
        idx.reset(n_rec)
        scanned = len(idx)
        good, cum = self._scan(fd, idx, end, stop, cum)
        if good < fsize:
            self._cut(fd, start, good, fsize, torn_ok=head)
        rebuilt = len(idx) - scanned
        idx.flush()
        if rebuilt and not head:
            os.fdatasync(ifd)  # a sealed partition's rebuilt index: make the next open fast
            idx.synced_n = idx.n_file
        p = _Partition(start, fd, idx, good, cum)
        p.vend = min(end, good)  # trusted through the index, not checked: verified before it is served
        if not head:
            self._seal(p)
        if rebuilt > 1000:
            self._log.info("topic %s: %s: %d batches rescanned", self.topic, lpath, rebuilt)
        p.synced_size = 0  # durability of what a crashed process left is unknown: first job syncs it
        return p

    def _scan(self, fd: int, idx: PartitionIndex, pos: int, stop: int, cum: int) -> tuple[int, int]:
        """Check frames from ``pos`` up to ``stop``, adding index records; return (good end, cum)."""
        buf = b""
        base = pos  # file position of buf[0]
        i = 0
        start, next_report = pos, pos + _PROGRESS_BYTES
        while base + i < stop:
            try:
                h = parse_frame_header(buf, i)
            except InvalidBatchError:
                break
            need = _SCAN_CHUNK if h is None else h.frame_len
            if h is not None and base + i + need > stop:
                break
            if h is None or i + need > len(buf):
                more = os.pread(fd, min(max(need, _SCAN_CHUNK), stop - base - len(buf)), base + len(buf))
                if not more:
                    break
                buf = buf[i:] + more
                base += i
                i = 0
                if len(idx.pending) >= _PENDING_FLUSH:
                    idx.flush()  # a rebuild must not hold a whole partition's records in memory
                if base >= next_report:  # a long rescan (no usable index) shows progress
                    self._log.info("topic %s: rescanning: %d of %d MiB checked", self.topic,
                                   (base - start) >> 20, (stop - start) >> 20)
                    next_report = base + _PROGRESS_BYTES
                continue
            body, end = i + h.header_len, i + need
            try:
                if crc32(memoryview(buf)[body:end]) != h.crc or count_messages(buf, body, end) != h.count:
                    break
            except InvalidBatchError:
                break
            i = end
            cum += h.count
            idx.add(base + i, cum)
        return base + i, cum

    def _frame_valid_at(self, fd: int, pos: int, fsize: int) -> bool:
        hdr = os.pread(fd, 4096, pos)
        try:
            h = parse_frame_header(hdr)
        except InvalidBatchError:
            return False
        if h is None or pos + h.frame_len > fsize:
            return False
        frame = os.pread(fd, h.frame_len, pos)
        try:
            return crc32(frame[h.header_len :]) == h.crc and count_messages(frame, h.header_len) == h.count
        except InvalidBatchError:
            return False

    def _valid_frame_after(self, fd: int, pos: int, fsize: int) -> bool:
        """Whether any valid frame starts in ``(pos, fsize)``."""
        at = pos + 1
        while at < fsize:
            chunk = os.pread(fd, _SCAN_CHUNK, at)
            if not chunk:
                return False
            j = chunk.find(b"BATCH ")
            while j >= 0:
                if self._frame_valid_at(fd, at + j, fsize):
                    return True
                j = chunk.find(b"BATCH ", j + 1)
            at += max(1, len(chunk) - 5)
        return False

    def _cut(self, fd: int, start: int, good: int, fsize: int, *, torn_ok: bool) -> None:
        """Remove ``[good, fsize)`` from a partition: a torn tail, or corruption copied aside first."""
        lpath = self._lpath(start)
        n = fsize - good
        if torn_ok and not self._valid_frame_after(fd, good, fsize):
            self._log.warning("topic %s: %s: truncating torn tail at position %d (%d bytes)",
                              self.topic, lpath, good, n)
        else:
            copy = copy_aside(self._dir, start, fd, good, fsize, self._file_mode)
            self._log.error(
                "topic %s: CORRUPTION in %s at position %d (offset %d): %d bytes from there to the end "
                "are not a clean torn tail (bad bytes followed by more data); copied them to %s "
                "and truncated the partition",
                self.topic, lpath, good, start + good, n, copy,
            )
        os.ftruncate(fd, good)
        os.fsync(fd)

    # ------------------------------------------------------------------ writing

    def _create_partition(self, start: int) -> _Partition:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC
        try:
            fd = os.open(self._lpath(start), flags, self._file_mode)
        except OSError as e:
            raise StorageError(f"topic {self.topic}: cannot create partition {start}: {e}") from e
        try:
            ifd = os.open(self._ipath(start), flags, self._file_mode)
        except OSError as e:
            os.close(fd)
            self._unlink(self._lpath(start))
            raise StorageError(f"topic {self.topic}: cannot create index {start}: {e}") from e
        self._dir_dirty = True
        p = _Partition(start, fd, PartitionIndex(ifd, 0), 0, 0)
        p.synced_size = 0
        return p

    def _write(self, fd: int, frame: bytes | memoryview, n: int, pos: int) -> None:
        w = _pwrite(fd, frame, pos)
        if w == n:
            return
        view = memoryview(frame).cast("B")
        while w < n:
            if w <= 0:
                raise OSError(errno.EIO, "write made no progress")
            pos += w
            view = view[w:]
            n -= w
            w = _pwrite(fd, view, pos)

    def _seal(self, p: _Partition) -> None:
        if p.idx.pending:
            return  # the index write failed: keep using pread + pending
        try:
            p.idx.seal()
        except (OSError, ValueError) as e:  # lookups fall back to pread
            self._log.warning("topic %s: cannot map index of partition %d: %s", self.topic, p.start, e)

    def _flush_index(self, p: _Partition) -> None:
        try:
            p.idx.flush()
        except OSError as e:  # the records stay pending in memory; retried later
            self._log.warning("topic %s: cannot write index of partition %d: %s", self.topic, p.start, e)

    def append(self, frame: bytes | memoryview, count: int) -> int:
        """Write one whole frame (page cache only), rotating and applying retention; return its offset.

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
        if self._needs_truncate:
            try:
                os.ftruncate(hp.fd, pos)
            except OSError as e:
                raise StorageError(f"topic {self.topic}: write failed: {e}") from e
            self._needs_truncate = False
        try:
            self._write(hp.fd, frame, n, pos)
        except OSError as e:
            try:
                os.ftruncate(hp.fd, pos)
            except OSError:
                self._needs_truncate = True
            raise StorageError(f"topic {self.topic}: write failed: {e}") from e
        offset = self.head
        hp.size = pos + n
        hp.cum += count
        hp.idx.add(hp.size, hp.cum)
        self.head = offset + n
        if len(hp.idx.pending) >= _PENDING_FLUSH:
            self._flush_index(hp)
        return offset

    def _append_rotate(self, frame: bytes | memoryview, n: int, count: int) -> int:
        old = self._parts[-1]
        if self._needs_truncate:
            try:
                os.ftruncate(old.fd, old.size)
            except OSError as e:
                raise StorageError(f"topic {self.topic}: write failed: {e}") from e
            self._needs_truncate = False
        self._flush_index(old)
        self._seal(old)
        start = self.head
        p = self._create_partition(start)
        try:
            self._write(p.fd, frame, n, 0)
        except OSError as e:
            _close_quietly([p.fd])
            p.idx.close()
            self._unlink(self._lpath(start))
            self._unlink(self._ipath(start))
            raise StorageError(f"topic {self.topic}: write failed: {e}") from e
        p.size = n
        p.cum = count
        p.idx.add(n, count)
        self._parts.append(p)
        self._starts.append(start)
        self.head = start + n
        self.rotations += 1
        while len(self._parts) > self._pmax:
            gone = self._parts.pop(0)
            del self._starts[0]
            _close_quietly([gone.fd])
            gone.idx.close()
            self._unlink(self._lpath(gone.start))
            self._unlink(self._ipath(gone.start))
        self.first = self._parts[0].start
        return start

    # ------------------------------------------------------------------ syncing

    def _capture(self, *, all_indexes: bool) -> SyncJob | None:
        if self._closed:
            return None
        hp = self._parts[-1]
        data: list[_Partition] = []
        index: list[_Partition] = []
        for p in self._parts:
            if p.idx.pending:
                self._flush_index(p)
            if p.size > p.synced_size:
                data.append(p)
            unsynced = p.idx.n_file - p.idx.synced_n
            if unsynced > 0 and (p is not hp or all_indexes or unsynced * REC_SIZE >= _INDEX_SYNC_BYTES):
                index.append(p)
        if not data and not index and not self._dir_dirty:
            return None
        data_fds: list[int] = []
        index_fds: list[int] = []
        try:
            for p in data:
                data_fds.append(os.dup(p.fd))
            for p in index:
                index_fds.append(os.dup(p.idx.fd))
            dir_fd = os.dup(self._dir_fd) if self._dir_dirty else None
        except OSError as e:
            _close_quietly(data_fds + index_fds)
            raise StorageError(f"topic {self.topic}: cannot capture sync job: {e}") from e
        for p in data:
            p.synced_size = p.size
        for p in index:
            p.idx.synced_n = p.idx.n_file
        self._dir_dirty = False
        return SyncJob(self.head, data_fds, index_fds, dir_fd, self)

    def sync_job(self) -> SyncJob | None:
        """Capture everything appended and not yet covered by a job (None if nothing).

        Call on the owning thread; run the job anywhere (it owns dup'ed fds).
        """
        return self._capture(all_indexes=False)

    def sync(self) -> None:
        """Blocking: capture and run a job, if there is anything to sync."""
        job = self._capture(all_indexes=True)
        if job is not None:
            job.run()

    # ------------------------------------------------------------------ reading

    def read_plan(self, offset: int, limit: int, end: int | None = None) -> ReadPlan:
        """Batches from exactly ``offset`` while the message sum is below ``limit``; may span partitions.

        ``end`` (a batch boundary, default the head) hides the batches at and
        after it: the server passes its acknowledged head so that no reader
        sees a batch before it is durable.  Raises :class:`NotFound` unless
        ``offset`` starts a retained batch before ``end``.  The plan owns
        dup'ed fds: close it.
        """
        stop = self.head if end is None else min(end, self.head)
        if self._closed or offset < self.first or offset >= stop:
            raise NotFound(f"offset {offset} not in [{self.first}, {self.head})")
        j = bisect_right(self._starts, offset) - 1
        p = self._parts[j]
        i = p.idx.find_start(offset - p.start)
        if i < 0:
            raise NotFound(f"offset {offset} is not the start of a batch")
        plan = ReadPlan(offset)
        remaining = max(limit, 1)
        try:
            while True:
                b_end, base = p.idx.entry(i - 1)
                k = p.idx.first_reaching(i, base + remaining)
                if k >= len(p.idx):
                    k = len(p.idx) - 1
                e_end, e_cum = p.idx.entry(k)
                if p.start + e_end > stop:
                    # Largest batch in [i, k] that ends at or before ``stop``.
                    lo, hi = i, k
                    while lo < hi:
                        mid = (lo + hi + 1) // 2
                        if p.start + p.idx.entry(mid)[0] <= stop:
                            lo = mid
                        else:
                            hi = mid - 1
                    k = lo
                    e_end, e_cum = p.idx.entry(k)
                    remaining = 0  # nothing visible beyond this batch
                if p.bad.starts:
                    hit = p.bad.first_overlap(b_end, e_end)
                    if hit is not None:  # a batch that failed verification: stop before it
                        if hit[0] <= b_end:
                            if plan.segments:
                                break
                            raise CorruptData(f"topic {self.topic}: batch at offset {offset} is corrupt")
                        k = p.idx.last_end_at_most(hit[0])
                        e_end, e_cum = p.idx.entry(k)
                        remaining = 0
                if b_end < p.vend:  # written by an earlier process and not verified yet
                    for a, b in p.verified.missing(b_end, min(e_end, p.vend)):
                        plan.checks.append((p.start, a, b))
                p.idx.hint(e_end, k + 1)
                plan.segments.append((os.dup(p.fd), b_end, e_end - b_end))
                plan.nbatches += k - i + 1
                plan.nmessages += e_cum - base
                plan.nbytes += e_end - b_end
                remaining -= e_cum - base
                j += 1
                if remaining <= 0 or j >= len(self._parts):
                    break
                nxt = self._parts[j]
                if nxt.start >= stop:
                    break
                if nxt.start != p.start + p.size or nxt.size == 0:
                    break  # a gap left by recovery: stop here
                p, i = nxt, 0
        except OSError as e:
            plan.close()
            raise StorageError(f"topic {self.topic}: cannot plan read: {e}") from e
        except BaseException:
            plan.close()
            raise
        return plan

    # ------------------------------------------------------------------ verification

    def _part_at(self, start: int) -> _Partition | None:
        j = bisect_right(self._starts, start) - 1
        if j >= 0 and self._starts[j] == start:
            return self._parts[j]
        return None

    def _records(self, p: _Partition, i: int, k: int) -> bytes:
        """Raw index records ``i..k`` of ``p`` (file part with one pread, then pending)."""
        idx = p.idx
        out = b""
        if i < idx.n_file:
            top = min(k + 1, idx.n_file)
            out = os.pread(idx.fd, (top - i) * REC_SIZE, i * REC_SIZE)
            if len(out) != (top - i) * REC_SIZE:
                raise StorageError(f"topic {self.topic}: index of partition {p.start} shrank")
            i = top
        if i <= k:
            out += bytes(idx.pending[(i - idx.n_file) * REC_SIZE : (k + 1 - idx.n_file) * REC_SIZE])
        return out

    def verify_job(self, checks: list[tuple[int, int, int]]) -> VerifyJob:
        """A job checking ``checks`` (``ReadPlan.checks``: batch-aligned ranges); run it anywhere."""
        parts: list[tuple[int, int, int, int, bytes]] = []
        try:
            for start, a, b in checks:
                p = self._part_at(start)
                if p is None or self._closed:
                    continue
                i = p.idx.find_start(a)
                k = p.idx.last_end_at_most(b)
                if i < 0 or k < i:
                    continue
                records = self._records(p, i, k)
                parts.append((start, os.dup(p.fd), a, p.idx.entry(i - 1)[1], records))
        except OSError as e:
            _close_quietly([fd for _, fd, _, _, _ in parts])
            raise StorageError(f"topic {self.topic}: cannot verify: {e}") from e
        return VerifyJob(self.topic, self._dir, self._file_mode, parts)

    def scrub_job(self, max_bytes: int) -> VerifyJob | None:
        """The next unverified range (about ``max_bytes``, newest partition first), or None when done."""
        for p in reversed(self._parts):
            if p.vend == 0:
                continue
            gaps = p.verified.missing(0, p.vend)
            if not gaps:
                p.vend = 0
                p.verified = _Ranges()
                continue
            a, b = gaps[0]
            i = p.idx.find_start(a)
            k = max(i, p.idx.last_end_at_most(a + max_bytes))
            b = min(b, p.idx.entry(k)[0])
            return self.verify_job([(p.start, a, b)])
        return None

    @property
    def unverified_bytes(self) -> int:
        """Bytes of earlier processes' frames not verified yet (the scrub's remaining work)."""
        return sum(b - a for p in self._parts if p.vend for a, b in p.verified.missing(0, p.vend))

    def apply_verification(self, job: VerifyJob) -> None:
        """Record a finished job's result (owning thread): verified ranges, bad batches (logged loudly)."""
        for start, a, b, where in job.bad:
            p = self._part_at(start)
            if p is None:
                continue
            p.bad.add(a, b)
            self._log.error(
                "topic %s: CORRUPTION in %s: the batches at offsets [%d, %d) (positions %d..%d) fail their "
                "CRC/framing check; they are not served (ERR corrupt data); their bytes were copied to %s",
                self.topic, self._lpath(start), start + a, start + b, a, b, where,
            )
        for start, a, b in job.checked:
            p = self._part_at(start)
            if p is None or p.vend == 0:
                continue
            p.verified.add(a, b)
            if not p.verified.missing(0, p.vend):
                p.vend = 0
                p.verified = _Ranges()

    # ------------------------------------------------------------------ closing

    def _close_fds(self) -> None:
        fds = [self._dir_fd]
        for p in self._parts:
            fds.append(p.fd)
            p.idx.close()
        self._parts = []
        self._starts = []
        _close_quietly(fds)

    def close(self) -> None:
        """Sync (data and indexes) and close all fds.  Idempotent."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self._closed = True
            self._close_fds()

    def close_without_sync(self) -> None:
        """Close all fds without fsync (after an I/O error, or when shutdown ran
        out of time): what is on disk is left to recovery.  Idempotent."""
        if not self._closed:
            self._closed = True
            self._close_fds()

    def __enter__(self) -> TopicLog:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
