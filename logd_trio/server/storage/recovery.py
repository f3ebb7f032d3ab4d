"""Opening a topic directory: find the partitions, check their indexes, repair what a crash left.

Synchronous, no trio; run it off the Trio thread.  For each ``<start>.log``:
the index is checked against the log (:func:`~logd_trio.server.storage.index.validate`)
and whatever it does not cover is rescanned frame by frame; a torn tail is
truncated; damage followed by more data is copied aside first (never silently
dropped).  Frames trusted through the index are verified later, before they
are first served (:mod:`logd_trio.server.storage.verify`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from logd_trio.core.errors import InvalidBatchError, StorageError
from logd_trio.core.framing import check_frame, parse_frame_header
from logd_trio.server.storage import files
from logd_trio.server.storage.epochs import EPOCHS_NAME
from logd_trio.server.storage.files import (
    CORRUPT_MARK,
    GO_INDEX_SUFFIX,
    INDEX_SUFFIX,
    LOG_SUFFIX,
    O_CLOEXEC,
    close_quietly,
    copy_aside,
    index_path,
    log_path,
    parse_start,
    remove_files,
)
from logd_trio.server.storage.index import (
    HEADER_SIZE,
    INDEX_SYNC_BYTES,
    PENDING_FLUSH,
    REC_SIZE,
    REC_V2,
    PartitionIndex,
    read_layout,
    validate,
    write_header,
)
from logd_trio.server.storage.partition import Partition
from logd_trio.server.storage.rebuild import damaged_end, next_frame
from logd_trio.server.storage.syscalls import current

__all__ = ["Recovery"]

SCAN_CHUNK = files.SCAN_CHUNK
# A rescan logs its progress every this many bytes.
PROGRESS_BYTES = 256 << 20
# On open, frames in the last this-many indexed bytes of the head partition are
# re-verified (CRC + framing): the index may reach disk before the log data.
VERIFY_TAIL = 64 * 1024


# File times come from a coarse clock (up to a scheduler tick behind the wall clock the
# server's times come from): an mtime standing for an append time gets this much more.
MTIME_SLACK_MS = 20
# At open the times of the last this-many records of an index are checked (trusted_times): of the
# newest partitions, as many as an unsynced index tail may hold (a sealed one's is synced soon after
# its rotation, the head's every 256 KiB), of the others a few pages.
TIME_TAIL_NEW = INDEX_SYNC_BYTES // REC_V2.size + 1
TIME_TAIL = 512
NEW_PARTITIONS = 4


def trusted_times(idx: PartitionIndex, n: int, lo: int, hi: int, tail: int) -> tuple[int, int]:
    """``(k, t)``: the first ``k`` records' times look right (in ``[lo, hi]``, never decreasing), record
    ``k``'s (time ``t``) does not (``k == n``: all do).  Checks the records :func:`validate` samples
    and the last ``tail`` (a crash tears the unsynced tail, where a record's time may sit on
    another page than its position); between a good and a bad sample, binary-searches the first bad."""
    first_tail = max(n - tail, 0)
    ks = sorted({0, *(n * j // 8 for j in range(1, 8))} - set(range(first_tail, n)))
    good, prev = -1, lo
    bad = -1
    for k in ks:
        t = idx.time(k)
        if not prev <= t <= hi:
            bad, bad_t = k, t
            break
        good, prev = k, t
    if bad < 0:  # the tail: one read
        raw = os.pread(idx.fd, (n - first_tail) * idx.rs, idx.base + first_tail * idx.rs)
        for k, (_, _, t) in enumerate(REC_V2.iter_unpack(raw[: len(raw) - len(raw) % idx.rs]), first_tail):
            if not prev <= t <= hi:
                bad, bad_t = k, t
                break
            good, prev = k, t
        else:
            if len(raw) == (n - first_tail) * idx.rs:
                return n, 0
            bad, bad_t = first_tail + len(raw) // idx.rs, -1  # (the file shrank meanwhile)
    while bad - good > 1:
        mid = (good + bad) // 2
        t = idx.time(mid)
        if prev <= t <= hi:
            good, prev = mid, t
        else:
            bad, bad_t = mid, t
    return bad, bad_t


def _mtime_ms(st: os.stat_result) -> int:
    """An upper bound of the time (Unix ms) a file was last written."""
    return -(-st.st_mtime_ns // 1_000_000) + MTIME_SLACK_MS


class Recovery:
    """One topic directory being opened; :meth:`run` returns its partitions, oldest first."""

    def __init__(self, directory: Path, topic: str, file_mode: int, log: logging.Logger) -> None:
        self.dir = directory
        self._lo = 0  # the newest append time read from the indexes so far: no later batch is earlier
        self.topic = topic
        self.file_mode = file_mode
        self.log = log
        self.dir_dirty = False  # entries were removed or created: the directory needs an fsync
        self._t = 0  # the time of batches the scan finds (see _files)
        self._known: dict[int, int] = {}  # end position -> time of records the scan re-adds

    def run(self) -> list[Partition]:
        """Recover every partition (creating partition 0 if there is none).

        Raises :class:`StorageError` (chained); partitions opened so far are closed then.
        """
        logs: list[int] = []
        indexes: set[int] = set()
        for name in os.listdir(self.dir):
            start = parse_start(name, LOG_SUFFIX)
            if start is not None and (self.dir / name).is_file():
                logs.append(start)
                continue
            istart = parse_start(name, INDEX_SUFFIX)
            if istart is not None:
                indexes.add(istart)
            elif parse_start(name, GO_INDEX_SUFFIX) is None and CORRUPT_MARK not in name and EPOCHS_NAME not in name:
                self.log.warning("topic %s: ignoring stray file %s", self.topic, self.dir / name)
        logs.sort()
        for start in sorted(indexes.difference(logs)):
            self.log.warning("topic %s: removing orphan index %s", self.topic, index_path(self.dir, start))
            remove_files([index_path(self.dir, start)], self.log, self.topic)
        parts: list[Partition] = []
        try:
            for i, start in enumerate(logs):
                last = i == len(logs) - 1
                limit = None if last else logs[i + 1] - start
                try:
                    p = self._partition(start, limit, head=last, new=i >= len(logs) - NEW_PARTITIONS)
                except OSError as e:
                    raise StorageError(f"topic {self.topic}: recovering {log_path(self.dir, start)}: {e}") from e
                if p.size == 0 and not last:
                    self.log.warning("topic %s: removing empty partition %s", self.topic, log_path(self.dir, start))
                    p.close()
                    remove_files(p.paths(self.dir), self.log, self.topic)
                    self.dir_dirty = True
                    continue
                parts.append(p)
            if not parts:
                try:
                    parts.append(Partition.create(self.dir, 0, self.file_mode))
                except OSError as e:
                    raise StorageError(f"topic {self.topic}: cannot create partition 0: {e}") from e
                self.dir_dirty = True
        except BaseException:
            for p in parts:
                p.close()
            raise
        return parts

    def _partition(self, start: int, limit: int | None, *, head: bool, new: bool) -> Partition:
        fd = os.open(log_path(self.dir, start), os.O_RDWR | O_CLOEXEC)
        try:
            ifd = os.open(index_path(self.dir, start), os.O_RDWR | os.O_CREAT | O_CLOEXEC, self.file_mode)
        except OSError:
            os.close(fd)
            raise
        try:
            return self._files(start, fd, ifd, limit, head=head, tail=TIME_TAIL_NEW if new else TIME_TAIL)
        except BaseException:
            close_quietly([fd, ifd])
            raise

    def _files(self, start: int, fd: int, ifd: int, limit: int | None, *, head: bool, tail: int) -> Partition:
        lpath = log_path(self.dir, start)
        st = os.fstat(fd)
        fsize = st.st_size
        stop = fsize if limit is None else min(fsize, limit)
        isize = os.fstat(ifd).st_size
        timed, fresh = read_layout(ifd, isize)
        if fresh and isize:  # a header torn by a crash, an unknown version: a v2 index from the scan
            self.log.warning("topic %s: index of %s has no valid header; rescanning", self.topic, lpath)
        base, rs = (HEADER_SIZE, REC_V2.size) if timed else (0, REC_SIZE)
        n_rec, why = (0, "") if fresh else validate(fd, ifd, (isize - base) // rs, stop, base, rs)
        if why:
            self.log.warning("topic %s: index of %s: %s; rescanning", self.topic, lpath, why)
        elif (isize - base) % rs:
            self.log.warning("topic %s: index of %s has a torn record; rescanning tail", self.topic, lpath)
        if n_rec == 0 and (fresh or not timed):
            # nothing to keep (no index yet: a Go data directory, a crash at creation; or one not
            # a record of which holds): a v2 index from the scan, whatever the old one was
            idx = self._fresh_v2(ifd)
            timed, isize, base, rs = True, HEADER_SIZE, idx.base, idx.rs
        else:
            idx = PartitionIndex(ifd, n_rec, timed=timed)
        hi = _mtime_ms(st)  # no batch was appended after the log's last change
        if timed and n_rec:
            ok, bad_t = trusted_times(idx, n_rec, self._lo, hi, tail)
            if ok < n_rec:
                self.log.warning("topic %s: index of %s: the time of record %d (%d) is not plausible (not in "
                                 "[%d, %d] or earlier than the one before); rescanning from there", self.topic,
                                 lpath, ok, bad_t, self._lo, hi)
                n_rec = ok
                idx.reset(n_rec)
        end, cum = idx.entry(n_rec - 1)
        known: dict[int, int] = {}
        if head and end > 0:
            # The index may have reached disk before the log data: re-verify its tail (keeping the
            # times of the records the rescan finds again).
            k = idx.last_end_at_most(end - VERIFY_TAIL)
            if timed:
                known = {idx.entry(j)[0]: t for j in range(k + 1, n_rec) if self._lo <= (t := idx.time(j)) <= hi}
            end, cum = idx.entry(k)
            n_rec = k + 1
        if base + n_rec * rs != isize:
            current().ftruncate(ifd, base + n_rec * rs)
        idx.reset(n_rec)
        # The batches the scan adds were appended at unknown times, none after the log's last
        # change: its mtime stands for them (kept from decreasing).
        self._t = max(hi, idx.time(n_rec - 1) if n_rec else 0)
        self._known = known
        scanned = len(idx)
        good, cum = self._scan(fd, idx, end, stop, cum)
        if good == end > 0 and good < stop:
            # No valid frame where the index says one starts: the index is wrong, not the log.
            self.log.warning("topic %s: index of %s points at no valid frame (position %d); rescanning "
                             "the whole partition", self.topic, lpath, end)
            idx = self._fresh_v2(ifd)  # (a v1 one too: its times are unknown anyway)
            timed = True
            scanned = end = 0
            good, cum = self._scan(fd, idx, 0, stop, 0)
        bad: list[tuple[int, int]] = []
        while good < stop and next_frame(fd, good, stop) < stop:
            # damage followed by valid frames: keep them, withhold only the damaged bytes
            nxt = damaged_end(fd, good, stop)
            self._damaged(fd, start, good, nxt)
            bad.append((good, nxt))
            cum += 1  # a placeholder record for the damaged range
            idx.add(nxt, cum, max(self._t, idx.time(len(idx) - 1) if len(idx) else 0))
            good, cum = self._scan(fd, idx, nxt, stop, cum)
        if good < fsize:
            self._cut(fd, start, good, fsize, torn_ok=head)
        rebuilt = len(idx) - scanned
        idx.flush()
        if rebuilt and not head:
            current().fdatasync(ifd)  # a sealed partition's rebuilt index: make the next open fast
            idx.synced_n = idx.n_file
        p = Partition(start, fd, idx, good, cum)
        if good:
            p.newest = idx.time(len(idx) - 1) if timed else max(hi, self._lo)
            if timed and scanned:  # the last time read from the index (the scan's are stand-ins)
                self._lo = max(self._lo, idx.time(scanned - 1))
        for a, b in bad:
            p.bad.add(a, b)
        p.vend = min(end, good)  # trusted through the index, not checked: verified before it is served
        if rebuilt > 1000:
            self.log.info("topic %s: %s: %d batches rescanned", self.topic, lpath, rebuilt)
        p.synced_size = 0  # durability of what a crashed process left is unknown: first job syncs it
        return p

    def _fresh_v2(self, ifd: int) -> PartitionIndex:
        """Cut the index file to nothing and make it an empty v2 index."""
        current().ftruncate(ifd, 0)
        write_header(ifd)
        return PartitionIndex(ifd, 0, timed=True)

    def _scan(self, fd: int, idx: PartitionIndex, pos: int, stop: int, cum: int) -> tuple[int, int]:
        """Check frames from ``pos`` up to ``stop``, adding index records; return (good end, cum)."""
        buf = b""
        base = pos  # file position of buf[0]
        i = 0
        t = idx.time(len(idx) - 1) if len(idx) else 0  # times never decrease
        start, next_report = pos, pos + PROGRESS_BYTES
        while base + i < stop:
            try:
                h = parse_frame_header(buf, i)
            except InvalidBatchError:
                break
            need = SCAN_CHUNK if h is None else h.frame_len
            if h is not None and base + i + need > stop:
                break
            if h is None or i + need > len(buf):
                more = os.pread(fd, min(max(need, SCAN_CHUNK), stop - base - len(buf)), base + len(buf))
                if not more:
                    break
                buf = buf[i:] + more
                base += i
                i = 0
                if len(idx.pending) >= PENDING_FLUSH:
                    idx.flush()  # a rebuild must not hold a whole partition's records in memory
                if base >= next_report:  # a long rescan (no usable index) shows progress
                    self.log.info("topic %s: rescanning: %d of %d MiB checked", self.topic,
                                  (base - start) >> 20, (stop - start) >> 20)
                    next_report = base + PROGRESS_BYTES
                continue
            if check_frame(buf, i, i + need) is None:
                break
            i += need
            cum += h.count
            t = max(self._known.get(base + i, self._t), t)
            idx.add(base + i, cum, t)
        return base + i, cum

    def _damaged(self, fd: int, start: int, a: int, b: int) -> None:
        """Bytes ``[a, b)`` of a partition are not valid batches, valid ones follow: copy them aside, log it."""
        copy = copy_aside(self.dir, start, fd, a, b, self.file_mode, reuse=True)
        self.log.error(
            "topic %s: CORRUPTION in %s at positions %d..%d (offsets [%d, %d)): not valid batches, "
            "valid ones follow; they are not served (ERR corrupt data); copied them to %s",
            self.topic, log_path(self.dir, start), a, b, start + a, start + b, copy,
        )

    def _cut(self, fd: int, start: int, good: int, fsize: int, *, torn_ok: bool) -> None:
        """Remove ``[good, fsize)`` from a partition: a torn tail, or corruption copied aside first."""
        lpath = log_path(self.dir, start)
        n = fsize - good
        if torn_ok:  # (no valid frame follows: see the caller)
            self.log.warning("topic %s: %s: truncating torn tail at position %d (%d bytes)",
                             self.topic, lpath, good, n)
        else:
            copy = copy_aside(self.dir, start, fd, good, fsize, self.file_mode)
            self.log.error(
                "topic %s: CORRUPTION in %s at position %d (offset %d): the %d bytes from there to the "
                "end are not valid batches, and a sealed partition has no torn tail; copied them to %s "
                "and truncated the partition",
                self.topic, lpath, good, start + good, n, copy,
            )
        current().ftruncate(fd, good)
        current().fsync(fd)
