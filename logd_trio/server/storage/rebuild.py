"""Rebuilding a partition's index from its ``.log`` when the two disagree.

The ``.log`` is the truth; the index is a cache.  When a read or the scrub
finds a record the log contradicts, or an index file damaged under the
server, :class:`RebuildJob` scans the log from position 0 (in a worker
thread), writes a fresh index beside it and swaps it in (:func:`apply`, on the
owning thread).  Only what that scan finds wrong in the ``.log`` itself is
corruption: it is copied aside, logged loudly and never served; a damaged
index alone costs nothing but the scan.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from logd_trio.core.errors import InvalidBatchError, StorageError
from logd_trio.core.framing import FrameHeader, check_frame, parse_frame_header
from logd_trio.server.storage.files import (
    O_CLOEXEC,
    SCAN_CHUNK,
    close_quietly,
    copy_aside,
    index_path,
    log_path,
    write_all,
)
from logd_trio.server.storage.index import HEADER, REC, REC_V2
from logd_trio.server.storage.partition import Partition
from logd_trio.server.storage.syscalls import current

__all__ = ["IndexSuspect", "RebuildJob", "apply", "damaged_end", "frame_at", "next_frame", "start_job"]


class IndexSuspect(StorageError):
    """The index of partition ``start`` disagrees with its log: rebuild it, then plan again."""

    def __init__(self, start: int, generation: int, why: str) -> None:
        super().__init__(f"index of partition {start}: {why}")
        self.start = start
        self.generation = generation


def frame_at(fd: int, pos: int, stop: int) -> tuple[int, int]:
    """``(length, count)`` of the valid frame at ``pos`` of the file ending by ``stop``, else ``(0, 0)``."""
    try:
        h = parse_frame_header(os.pread(fd, 4096, pos))
    except InvalidBatchError:
        return 0, 0
    if h is None or pos + h.frame_len > stop:
        return 0, 0
    if check_frame(os.pread(fd, h.frame_len, pos)) is None:
        return 0, 0
    return h.frame_len, h.count


def next_frame(fd: int, pos: int, stop: int, *, any_header: bool = False) -> int:
    """Start of the first valid frame of the file in ``(pos, stop)`` (``stop`` if none); with
    ``any_header``, of the first frame whose header parses and fits, valid or not."""
    at = pos + 1
    while at < stop:
        chunk = os.pread(fd, min(SCAN_CHUNK, stop - at), at)
        if not chunk:
            break
        j = chunk.find(b"BATCH ")
        while j >= 0:
            if any_header:
                h = _header_at(fd, at + j)
                if h is not None and at + j + h.frame_len <= stop:
                    return at + j
            elif frame_at(fd, at + j, stop)[0]:
                return at + j
            j = chunk.find(b"BATCH ", j + 1)
        at += max(1, len(chunk) - 5)
    return stop


def _header_at(fd: int, pos: int) -> FrameHeader | None:
    try:
        return parse_frame_header(os.pread(fd, 4096, pos))
    except InvalidBatchError:
        return None


def damaged_end(fd: int, pos: int, stop: int) -> int:
    """Where the damaged bytes at ``pos`` end: past the frame its own header describes when
    another frame header (or ``stop``) follows there, else at the next frame header."""
    h = _header_at(fd, pos)
    if h is not None and pos + h.frame_len <= stop:
        end = pos + h.frame_len
        if end == stop or _header_at(fd, end) is not None:
            return end
    return next_frame(fd, pos, stop, any_header=True)


class RebuildJob:
    """Scan ``[0, stop)`` of partition ``start`` and write its index anew.  ``run`` is blocking."""

    def __init__(self, p: Partition, fd: int, old_fd: int, directory: Path, file_mode: int, topic: str,
                 time_ms: int) -> None:
        self.start = p.start
        self.generation = p.generation
        self.stop = p.idx.file_end  # what the file part of the index covers (the rest is pending)
        self.old_cum = p.idx.file_cum
        self.topic = topic
        self._fd = fd
        self._old_fd = old_fd  # the index being replaced: a hint for where damaged batches end
        self._old_n = p.idx.n_file
        self._timed, self._base, self._rs = p.idx.timed, p.idx.base, p.idx.rs
        # the time a rebuilt record gets when the old index has none for it (the log does not say
        # when its batches came): one no batch of the rebuilt range is later than
        self._time = time_ms
        self._dir = directory
        self._file_mode = file_mode
        self.new_fd = -1
        self.n = 0
        self.cum = 0
        self.bad: list[tuple[int, int, str]] = []  # (a, b, where the bytes were copied)

    def run(self) -> None:
        """Raises OSError if the log cannot be read or the index written (nothing is swapped then)."""
        records = bytearray(HEADER if self._timed else b"")
        cum = 0
        pos = 0
        t = 0
        old = self._old_times()
        old_end, old_t = next(old, (-1, 0))
        try:
            while pos < self.stop:
                n, count = self._frame(pos)
                if n:
                    pos += n
                    cum += count
                else:  # damage in the log itself: skip to the next batch (the old index's, if valid)
                    nxt = self._old_next(pos) or damaged_end(self._fd, pos, self.stop)
                    self.bad.append((pos, nxt, self._copy(pos, nxt)))
                    pos = nxt
                    cum += 1  # a placeholder record: the range is never served
                if self._timed:
                    while 0 <= old_end < pos:
                        old_end, old_t = next(old, (-1, 0))
                    # the time of the old record ending here, else of the next one (a batch ending
                    # later was not appended earlier); kept from going back, never later than the
                    # batches appended after the rebuilt range
                    t = max(t, min(old_t, self._time) if old_end >= 0 else self._time)
                    records += REC_V2.pack(pos, cum, t)
                else:
                    records += REC.pack(pos, cum)
            tmp = self._dir / f"{self.start}.index.rebuild"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, self._file_mode)
            try:
                write_all(fd, bytes(records), len(records), 0)
                os.replace(tmp, index_path(self._dir, self.start))
            except BaseException:
                os.close(fd)
                raise
        finally:
            close_quietly([self._fd, self._old_fd])
        self.new_fd = fd
        self.n = (len(records) - self._base) // self._rs
        self.cum = cum

    def _old_times(self) -> Iterator[tuple[int, int]]:
        """``(end, time)`` of the old index's records, in order (read a chunk at a time; stops early
        where the file ends or cannot be read)."""
        if not self._timed:
            return
        rs, chunk = self._rs, self._rs * 4096
        at, last = self._base, self._base + self._old_n * rs
        while at < last:
            try:
                raw = os.pread(self._old_fd, min(chunk, last - at), at)
            except OSError:
                return
            if len(raw) < rs:
                return
            for k in range(0, len(raw) - rs + 1, rs):
                end, _, t = REC_V2.unpack_from(raw, k)
                yield int(end), int(t)
            at += len(raw) - len(raw) % rs

    def _frame(self, pos: int) -> tuple[int, int]:
        return frame_at(self._fd, pos, self.stop)

    def _old_next(self, pos: int) -> int:
        """Where the old index says the batch at ``pos`` ends, if it has a batch starting there; else 0."""
        lo, hi = 0, self._old_n  # smallest k with end_k > pos
        try:
            while lo < hi:
                mid = (lo + hi) // 2
                if self._old_end(mid) <= pos:
                    lo = mid + 1
                else:
                    hi = mid
            if lo >= self._old_n:
                return 0
            prev = 0 if lo == 0 else self._old_end(lo - 1)
            end = self._old_end(lo)
        except (OSError, struct.error):
            return 0
        return end if prev == pos and pos < end <= self.stop else 0

    def _old_end(self, k: int) -> int:
        """``end_k`` of the old index.  Raises struct.error or OSError."""
        return int(REC.unpack(os.pread(self._old_fd, REC.size, self._base + k * self._rs))[0])

    def _copy(self, a: int, b: int) -> str:
        try:
            return str(copy_aside(self._dir, self.start, self._fd, a, b, self._file_mode, reuse=True))
        except OSError as e:
            return f"(copy failed: {e})"

    def discard(self) -> None:
        """Drop the result (the partition went away, or the caller was cancelled)."""
        close_quietly([self._fd, self._old_fd] + ([self.new_fd] if self.new_fd >= 0 else []))
        self.new_fd = -1


def start_job(p: Partition, directory: Path, file_mode: int, topic: str, log: logging.Logger) -> RebuildJob:
    """A job rebuilding ``p``'s index (owning thread): dup'ed fds, and ``p``'s new records held
    pending until :func:`apply`.  Raises :class:`StorageError` (chained)."""
    try:
        fd = current().dup(p.fd)
        try:
            old_fd = current().dup(p.idx.fd)
        except OSError:
            os.close(fd)
            raise
    except OSError as e:
        raise StorageError(f"topic {topic}: cannot rebuild an index: {e.strerror or type(e).__name__}") from e
    # The rebuilt records' time: the first pending record's (appended after all of them), else the newest.
    idx = p.idx
    time_ms = idx.time(idx.n_file) if len(idx) > idx.n_file else p.newest
    idx.frozen = True  # new records stay pending until the rebuilt file is in place
    log.warning("topic %s: index of partition %d disagrees with its log; rebuilding it", topic, p.start)
    return RebuildJob(p, fd, old_fd, directory, file_mode, topic, max(time_ms, 0))


def apply(job: RebuildJob, p: Partition | None, directory: Path, log: logging.Logger) -> None:
    """Swap the rebuilt index into ``p`` (owning thread); log what the scan found."""
    if p is None or p.generation != job.generation or job.new_fd < 0:
        job.discard()
        if p is not None:
            p.idx.frozen = False
        return
    delta = job.cum - job.old_cum
    p.idx.adopt(job.new_fd, job.n, job.stop, job.cum, delta)
    job.new_fd = -1
    p.cum += delta
    p.generation += 1
    for a, b, where in job.bad:
        p.bad.add(a, b)
        log.error(
            "topic %s: CORRUPTION in %s: the bytes at offsets [%d, %d) (positions %d..%d) are not valid "
            "batches; they are not served (ERR corrupt data); they were copied to %s",
            job.topic, log_path(directory, p.start), p.start + a, p.start + b, a, b, where,
        )
    p.mark_verified(0, job.stop)  # the scan checked every frame of it
    log.warning("topic %s: index of %s rebuilt from the log (%d batches)", job.topic,
                log_path(directory, p.start), job.n)
