"""Per-partition batch index: ``<start>.index`` beside ``<start>.log``.

Synchronous file code, no trio.  The format is logd-trio's own (Go's ``.idx``
files are never read, written or deleted).  Version 2 (what new indexes are):

* a 16-byte header: ``b"LOGDIDX\\0"``, the version (u32, 2) and the record
  size (u32, 24);
* then a flat array of 24-byte little-endian records, one per batch, in order:
  record ``i`` is ``(end_i, cum_i, time_i)``: ``end_i`` is the position in the
  partition file just past batch ``i`` (so batch ``i`` spans
  ``[end_{i-1}, end_i)`` with ``end_{-1} = 0``), ``cum_i`` is the number of
  messages in batches ``0..i`` of the partition, ``time_i`` the Unix time in
  milliseconds at which the server appended it (never decreasing).

Version 1 (earlier logd-trio releases) has no header and 16-byte records
``(end_i, cum_i)``: such a file still opens, keeps its format (records added to
it have no time) and its batches' time is unknown (:attr:`PartitionIndex.timed`
is False).  A v1 file never starts with the magic: its first 8 bytes are the
end of the first batch, far below ``2**56``.

Cumulative counts make ``READ``'s "add batches while the message sum is below
the limit" a search instead of a walk.  Lookups ``pread`` single records
(binary / galloping search), so memory does not grow with the number of
indexed batches, and a damaged file costs a rebuild, never a crash.
Records not yet written to the file live in ``pending`` (a ``bytearray`` in
the same format) and are written with one ``pwrite`` at flush time.

The index is a cache: it is never trusted blindly.  :func:`validate` checks
it against the ``.log`` before use, and the caller rescans whatever it does
not cover; frames trusted through it are verified before they are served,
and any disagreement with the ``.log`` rebuilds it from the ``.log``
(:mod:`logd_trio.server.storage.rebuild`).
"""

from __future__ import annotations

import contextlib
import os
import struct

from logd_trio.core.errors import InvalidBatchError, StorageError
from logd_trio.core.framing import parse_frame_header
from logd_trio.server.storage.syscalls import current

__all__ = ["HEADER", "HEADER_SIZE", "INDEX_SYNC_BYTES", "PENDING_FLUSH", "REC", "REC_SIZE", "REC_V2", "IndexDamaged",
           "PartitionIndex", "read_layout", "validate", "write_header"]

# Pending records are written to the page cache once they reach this size.
PENDING_FLUSH = 64 * 1024
# The head partition's index is fsynced when this many bytes of it are unsynced (TopicLog).
INDEX_SYNC_BYTES = 256 * 1024
# ``(end, cum)``: a whole v1 record, the first 16 bytes of a v2 record.
REC = struct.Struct("<QQ")
REC_SIZE = REC.size  # of a v1 record
REC_V2 = struct.Struct("<QQQ")  # (end, cum, time_ms)
MAGIC = b"LOGDIDX\0"
VERSION = 2
HEADER = struct.Struct("<8sII").pack(MAGIC, VERSION, REC_V2.size)
HEADER_SIZE = len(HEADER)
_TIME = struct.Struct("<Q")
_HEADER_READ = 4096
_SAMPLES = 8
_MAX_HINTS = 256
# Records are read from the file a page at a time and the last few pages kept: a read
# plan's searches (binary, galloping) touch a handful of records close together, and a
# pread per record made READ twice as costly as with the mapping it replaced.
_PAGE_RECS = 256  # records per page (4 KiB of v1 records, 6 KiB of v2)
_MAX_PAGES = 16  # pages kept per partition (at most 96 KiB)


class IndexDamaged(StorageError):
    """An index file no longer holds the records it held (truncated or replaced under the
    server): the partition's index must be rebuilt from its log."""


class PartitionIndex:
    """The records of one partition: ``n_file`` in the index file, then ``pending``.

    Records are read with ``pread`` (never through a mapping: a file truncated
    under the server must cost a rebuild, not a SIGBUS).  While ``frozen``
    (a rebuild is running) flushes keep the records pending.
    """

    __slots__ = ("_pages", "base", "fd", "file_cum", "file_end", "frozen", "hints", "n_file", "pending", "rs",
                 "synced_n", "timed")

    def __init__(self, fd: int, n_file: int, *, timed: bool = True) -> None:
        self.fd = fd
        self.timed = timed  # a v2 file (records carry their append time); False: v1
        self.base = HEADER_SIZE if timed else 0  # where record 0 starts in the file
        self.rs = REC_V2.size if timed else REC_SIZE  # record size
        self.pending = bytearray()  # records not yet written to the file
        self.n_file = 0
        self.file_end = 0
        self.file_cum = 0
        self.synced_n = 0
        self.frozen = False
        # position -> index of the batch starting there, remembered from recent read plans so that
        # a follower asking for "where my last read ended" costs no search
        self.hints: dict[int, int] = {}
        self._pages: dict[int, bytes] = {}  # page number -> its records in the file (oldest first)
        self.reset(n_file)

    def reset(self, n_file: int) -> None:
        """Declare the first ``n_file`` records of the file valid (recovery)."""
        self._pages.clear()
        self.n_file = self.synced_n = n_file  # records in the file / covered by a captured fsync
        # end position and cum of the last record in the file, kept in memory
        self.file_end, self.file_cum = self.entry(n_file - 1)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def __len__(self) -> int:
        return self.n_file + len(self.pending) // self.rs

    def add(self, end: int, cum: int, time_ms: int) -> None:
        """One more record (pending); ``time_ms`` is dropped by a v1 index."""
        if self.timed:
            self.pending += REC_V2.pack(end, cum, time_ms)
        else:
            self.pending += REC.pack(end, cum)

    def _record(self, i: int) -> tuple[bytes | bytearray, int]:
        """The buffer holding record ``i`` (``0 <= i < len``) and its position in it."""
        rs = self.rs
        if i >= self.n_file:
            return self.pending, (i - self.n_file) * rs
        page_no, k = divmod(i, _PAGE_RECS)
        page = self._pages.get(page_no)
        if page is None:
            first = page_no * _PAGE_RECS
            want = min(_PAGE_RECS, self.n_file - first) * rs  # only records the file holds for sure
            page = os.pread(self.fd, want, self.base + first * rs)
            page = page[: len(page) - len(page) % rs]
            if len(self._pages) >= _MAX_PAGES:
                del self._pages[next(iter(self._pages))]
            self._pages[page_no] = page
        if (k + 1) * rs > len(page):
            self._pages.pop(page_no, None)
            raise IndexDamaged(f"index file shrank under the server (record {i} of {self.n_file})")
        return page, k * rs

    def entry(self, i: int) -> tuple[int, int]:
        """``(end_i, cum_i)``; ``(0, 0)`` for ``i == -1``.  Raises :class:`IndexDamaged`
        (or OSError) if the file lost the record."""
        if i < 0:
            return 0, 0
        buf, at = self._record(i)
        end, cum = REC.unpack_from(buf, at)
        return int(end), int(cum)

    def time(self, i: int) -> int:
        """``time_i`` (Unix ms) of a v2 index; -1 for a v1 index (unknown).  Raises like :meth:`entry`."""
        if not self.timed:
            return -1
        buf, at = self._record(i)
        return int(_TIME.unpack_from(buf, at + REC_SIZE)[0])

    def first_at_or_after(self, time_ms: int) -> int:
        """Smallest ``k`` with ``time_k >= time_ms`` (times never decrease); ``len(self)`` if none.
        0 for a v1 index (its times are unknown: every batch may be that late)."""
        if not self.timed:
            return 0
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.time(mid) < time_ms:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def adopt(self, fd: int, n_file: int, end: int, cum: int, delta: int) -> None:
        """Switch to a rebuilt file of ``n_file`` records ending at ``(end, cum)``; the
        pending records' counts move by ``delta`` (the old file's count was wrong)."""
        old, self.fd = self.fd, fd
        with contextlib.suppress(OSError):
            os.close(old)
        if delta:
            for k in range(0, len(self.pending), self.rs):
                e, c = REC.unpack_from(self.pending, k)
                REC.pack_into(self.pending, k, e, c + delta)
        self.n_file, self.synced_n = n_file, 0
        self.file_end, self.file_cum = end, cum
        self.hints.clear()
        self._pages.clear()
        self.frozen = False

    def flush(self) -> None:
        """Write pending records to the file (page cache only).  Raises OSError.

        On failure the file is cut back to ``n_file`` records and the records
        stay pending, so nothing is lost and a later flush retries.
        """
        if not self.pending or self.frozen:
            return
        data = bytes(self.pending)
        pos = self.base + self.n_file * self.rs
        try:
            done = 0
            while done < len(data):
                w = current().pwrite(self.fd, data[done:], pos + done)
                if w <= 0:
                    raise OSError("short index write")
                done += w
        except OSError:
            with contextlib.suppress(OSError):
                current().ftruncate(self.fd, pos)
            raise
        self._pages.pop(self.n_file // _PAGE_RECS, None)  # the last page held fewer records
        self.n_file += len(data) // self.rs
        self.file_end, self.file_cum = REC.unpack_from(data, len(data) - self.rs)
        del self.pending[:]

    def find_start(self, pos: int) -> int:
        """Index of the batch that starts exactly at ``pos``, or -1."""
        n = len(self)
        if n == 0:
            return -1
        if pos == 0:
            return 0
        i = self.hints.get(pos)
        if i is not None:
            return i if i < n else -1
        nf = self.n_file
        if nf and pos == self.file_end:
            return nf if nf < n else -1
        lo, hi = (nf, n) if pos > self.file_end else (0, nf)  # smallest k in [lo, hi) with end_k >= pos
        top = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if self.entry(mid)[0] < pos:
                lo = mid + 1
            else:
                hi = mid
        if lo < top and lo + 1 < n and self.entry(lo)[0] == pos:
            return lo + 1
        return -1

    def hint(self, pos: int, i: int) -> None:
        """Remember that batch ``i`` starts (or will start) at ``pos``."""
        if len(self.hints) >= _MAX_HINTS:
            self.hints.clear()
        self.hints[pos] = i

    def first_reaching(self, i: int, target: int) -> int:
        """Smallest ``k >= i`` with ``cum_k >= target``; ``len(self)`` if none (galloping search)."""
        n = len(self)
        if i >= n or self.entry(i)[1] >= target:
            return min(i, n)
        lo = i  # cum_lo < target
        step = 1
        hi = i + 1
        while hi < n and self.entry(hi)[1] < target:
            lo = hi
            step *= 2
            hi = i + step
        hi = min(hi, n)  # cum_hi >= target, or hi == n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.entry(mid)[1] >= target:
                hi = mid
            else:
                lo = mid
        return hi

    def last_end_at_most(self, pos: int) -> int:
        """Largest ``k`` with ``end_k <= pos``, or -1."""
        lo, hi = -1, len(self) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.entry(mid)[0] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo


def write_header(fd: int) -> None:
    """Make ``fd`` (an empty index file) a v2 index.  Raises OSError."""
    if current().pwrite(fd, HEADER, 0) != HEADER_SIZE:
        raise OSError("short index header write")


def read_layout(fd: int, size: int) -> tuple[bool, bool]:
    """``(timed, fresh)`` of an index file of ``size`` bytes: v2 (``timed``) or v1, and whether it
    holds no valid header or record yet (empty, or a header torn by a crash, or a version this
    code does not know): the caller then cuts it to nothing and writes a v2 header."""
    if size == 0:
        return True, True
    head = os.pread(fd, HEADER_SIZE, 0)
    n = min(len(head), len(MAGIC))
    if head[:n] != MAGIC[:n]:
        return False, False  # v1: its first record's end is far below the magic read as a number
    return True, head != HEADER


def _entry_ok(log_fd: int, idx_fd: int, k: int, limit: int, base: int, rs: int) -> tuple[int, int] | None:
    """``(end_k, cum_k)`` if record ``k`` is consistent with the log, else None.

    Consistent: record ``k`` follows record ``k-1`` (positions and counts
    strictly increase), the batch ends within ``limit``, and a frame header
    parses at its start with exactly that length and message count.
    """
    if k == 0:
        raw = os.pread(idx_fd, rs, base)
        if len(raw) != rs:
            return None
        pend, pcum = 0, 0
        end, cum = REC.unpack_from(raw)
    else:
        raw = os.pread(idx_fd, 2 * rs, base + (k - 1) * rs)
        if len(raw) != 2 * rs:
            return None
        pend, pcum = REC.unpack_from(raw)
        end, cum = REC.unpack_from(raw, rs)
    if not (pend < end <= limit and pcum < cum):
        return None
    hdr = os.pread(log_fd, min(_HEADER_READ, end - pend), pend)
    try:
        h = parse_frame_header(hdr)
    except InvalidBatchError:
        return None
    if h is None or h.frame_len != end - pend or h.count != cum - pcum:
        return None
    return int(end), int(cum)


def validate(log_fd: int, idx_fd: int, n: int, limit: int, base: int = 0, rs: int = REC_SIZE) -> tuple[int, str]:
    """How many leading records of an ``n``-record index can be trusted.

    ``limit`` is how far the partition's frames may extend (file size, or the
    next partition's start).  Checks the first and last records and a few
    evenly spaced ones (each must be consistent with the log and all must be
    increasing).  If the failures form a tail (a crash left records past the
    log's durable end), binary-searches the last consistent record; if a
    record in the middle is bad while a later one is good, the index is
    garbage and nothing is trusted.  Returns ``(trusted, reason)``;
    ``reason`` is empty when all ``n`` are trusted.  Cost: O(log n) preads.  ``base``
    and ``rs``: where the records start and their size (v1: 0 and 16, v2: 16 and 24).
    """
    if n == 0:
        return 0, ""
    ks = sorted({0, n - 1, *(n * j // _SAMPLES for j in range(1, _SAMPLES))})
    good = -1
    good_end = good_cum = 0
    bad = -1
    for k in ks:
        e = _entry_ok(log_fd, idx_fd, k, limit, base, rs)
        if e is not None and good >= 0 and not (e[0] > good_end and e[1] > good_cum):
            e = None
        if e is None:
            if bad < 0:
                bad = k
            continue
        if bad >= 0:
            return 0, f"record {bad} is inconsistent with the log but record {k} is fine"
        good, (good_end, good_cum) = k, e
    if bad < 0:
        return n, ""
    lo, hi = good, bad  # lo consistent (or -1), hi not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        e = _entry_ok(log_fd, idx_fd, mid, limit, base, rs)
        if e is not None and (lo < 0 or (e[0] > good_end and e[1] > good_cum)):
            lo, (good_end, good_cum) = mid, e
        else:
            hi = mid
    return lo + 1, f"records from {lo + 1} on are not backed by the log"
