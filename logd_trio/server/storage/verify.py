"""Verification of frames an earlier process wrote: read checks and the background scrub.

A restart trusts the index for old partitions instead of rescanning them, so
frames in ``[0, vend)`` of such a partition are checked (CRC, MSG framing,
agreement with their index record) before they are first served.  The
owning thread builds a :class:`VerifyJob` (:func:`verify_job`), anything may
:meth:`VerifyJob.run` it, and the owner records the result with :func:`apply`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from logd_trio.core.errors import StorageError
from logd_trio.core.framing import check_frame
from logd_trio.server.storage.files import close_quietly, copy_aside, log_path
from logd_trio.server.storage.index import REC, REC_SIZE
from logd_trio.server.storage.partition import Partition
from logd_trio.server.storage.syscalls import current

__all__ = ["VerifyJob", "apply", "scrub_range", "verify_job"]

# Largest read of one verification step (a bigger single batch is read whole).
VERIFY_CHUNK = 4 << 20

# per part: (partition start, dup'ed fd, first position, cum before it, index records)
_Part = tuple[int, int, int, int, bytes]


class VerifyJob:
    """Checks stored batches against their CRC, framing and index record, off the owning thread.

    :meth:`run` is blocking and thread-safe (it owns dup'ed fds and copies of
    the index records).  Bad batches are copied aside
    (``<start>.log.corrupt-<pos>-<time>``) by ``run``.
    """

    __slots__ = ("_closed", "_dir", "_file_mode", "_parts", "bad", "checked", "nbytes", "topic")

    def __init__(self, topic: str, directory: Path, file_mode: int, parts: list[_Part]) -> None:
        self.topic = topic
        self._dir = directory
        self._file_mode = file_mode
        self._parts = parts
        self._closed = False
        self.nbytes = 0  # bytes read by run()
        self.checked: list[tuple[int, int, int]] = []  # (start, a, b): checked by run()
        self.bad: list[tuple[int, int, int, str]] = []  # (start, a, b, where the bytes were copied)

    @property
    def size(self) -> int:
        """Bytes this job will read."""
        return sum(REC.unpack_from(r, len(r) - REC_SIZE)[0] - pos for _, _, pos, _, r in self._parts if r)

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
            # one chunk: consecutive batches up to VERIFY_CHUNK bytes (at least one batch)
            j = i
            chunk_end = pos
            while j < n:
                end = REC.unpack_from(records, j * REC_SIZE)[0]
                if j > i and end - pos > VERIFY_CHUNK:
                    break
                chunk_end = end
                j += 1
            buf = os.pread(fd, chunk_end - pos, pos) if chunk_end > pos else b""
            self.nbytes += len(buf)
            base = pos
            for k in range(i, j):
                end, c = REC.unpack_from(records, k * REC_SIZE)
                h = check_frame(buf, pos - base, end - base) if c > cum else None
                ok = h is not None and h.frame_len == end - pos and h.count == c - cum and h.topic == topic
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
            close_quietly([fd for _, fd, _, _, _ in self._parts])


def _records(p: Partition, i: int, k: int) -> bytes:
    """Raw index records ``i..k`` of ``p`` (file part with one pread, then pending)."""
    idx = p.idx
    out = b""
    if i < idx.n_file:
        top = min(k + 1, idx.n_file)
        out = os.pread(idx.fd, (top - i) * REC_SIZE, i * REC_SIZE)
        if len(out) != (top - i) * REC_SIZE:
            raise StorageError(f"index of partition {p.start} shrank")
        i = top
    if i <= k:
        out += bytes(idx.pending[(i - idx.n_file) * REC_SIZE : (k + 1 - idx.n_file) * REC_SIZE])
    return out


def verify_job(topic: str, directory: Path, file_mode: int, part_at: Callable[[int], Partition | None],
               checks: Sequence[tuple[int, int, int]]) -> VerifyJob:
    """A job checking ``checks`` (``ReadPlan.checks``: batch-aligned ranges); run it anywhere.

    Raises :class:`StorageError` (chained) if the fds cannot be duplicated.
    """
    parts: list[_Part] = []
    sys = current()
    try:
        for start, a, b in checks:
            p = part_at(start)
            if p is None:
                continue
            i = p.idx.find_start(a)
            k = p.idx.last_end_at_most(b)
            if i < 0 or k < i:
                continue
            records = _records(p, i, k)
            parts.append((start, sys.dup(p.fd), a, p.idx.entry(i - 1)[1], records))
    except OSError as e:
        close_quietly([fd for _, fd, _, _, _ in parts])
        raise StorageError(f"topic {topic}: cannot verify: {e}") from e
    return VerifyJob(topic, directory, file_mode, parts)


def scrub_range(parts: Sequence[Partition], max_bytes: int) -> tuple[int, int, int] | None:
    """The next unverified ``(start, a, b)`` (about ``max_bytes``, newest partition first), or None."""
    for p in reversed(parts):
        gaps = p.unverified()
        if not gaps:
            p.vend = 0
            continue
        a, b = gaps[0]
        i = p.idx.find_start(a)
        k = max(i, p.idx.last_end_at_most(a + max_bytes))
        return p.start, a, min(b, p.idx.entry(k)[0])
    return None


def apply(job: VerifyJob, part_at: Callable[[int], Partition | None], directory: Path,
          log: logging.Logger) -> None:
    """Record a finished job's result (owning thread): verified ranges, bad batches (logged loudly)."""
    for start, a, b, where in job.bad:
        p = part_at(start)
        if p is None:
            continue
        p.bad.add(a, b)
        log.error(
            "topic %s: CORRUPTION in %s: the batches at offsets [%d, %d) (positions %d..%d) fail their "
            "CRC/framing check; they are not served (ERR corrupt data); their bytes were copied to %s",
            job.topic, log_path(directory, start), start + a, start + b, a, b, where,
        )
    for start, a, b in job.checked:
        p = part_at(start)
        if p is not None:
            p.mark_verified(a, b)
