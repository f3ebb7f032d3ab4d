"""Verification of frames an earlier process wrote: read checks and the background scrub.

A restart trusts the index for old partitions instead of rescanning them, so
frames in ``[0, vend)`` of such a partition are checked (CRC, MSG framing,
agreement with their index record) before they are first served.  The
owning thread builds a :class:`VerifyJob` (:func:`verify_job`), anything may
:meth:`VerifyJob.run` it, and the owner records the result with :func:`apply`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from logd_trio.core.errors import StorageError
from logd_trio.core.framing import check_frame
from logd_trio.server.storage.files import close_quietly
from logd_trio.server.storage.index import REC, IndexDamaged
from logd_trio.server.storage.partition import Partition
from logd_trio.server.storage.syscalls import current

__all__ = ["VerifyJob", "apply", "scrub_range", "verify_job"]

# Largest read of one verification step (a bigger single batch is read whole).
VERIFY_CHUNK = 4 << 20

# per part: (partition start, dup'ed fd, first position, cum before it, index records, record size)
_Part = tuple[int, int, int, int, bytes, int]


class VerifyJob:
    """Checks stored batches against their CRC, framing and index record, off the owning thread.

    :meth:`run` is blocking and thread-safe (it owns dup'ed fds and copies of
    the index records).  A batch that fails makes its partition ``suspect``:
    the caller rebuilds that index from the log (:mod:`.rebuild`), which finds
    out whether the log or the index is wrong.
    """

    __slots__ = ("_closed", "_dir", "_file_mode", "_parts", "checked", "nbytes", "suspect", "topic")

    def __init__(self, topic: str, directory: Path, file_mode: int, parts: list[_Part]) -> None:
        self.topic = topic
        self._dir = directory
        self._file_mode = file_mode
        self._parts = parts
        self._closed = False
        self.nbytes = 0  # bytes read by run()
        self.checked: list[tuple[int, int, int]] = []  # (start, a, b): checked by run()
        self.suspect: list[int] = []  # partitions whose log and index disagree: rebuild them

    @property
    def size(self) -> int:
        """Bytes this job will read."""
        return sum(REC.unpack_from(r, len(r) - rs)[0] - pos for _, _, pos, _, r, rs in self._parts if r)

    def run(self) -> None:
        """Verify every batch.  Raises OSError only if the log cannot be read."""
        try:
            for start, fd, pos, cum, records, rs in self._parts:
                self._run_part(start, fd, pos, cum, records, rs)
        finally:
            self.close()

    def _run_part(self, start: int, fd: int, pos: int, cum: int, records: bytes, rs: int) -> None:
        first = pos
        topic = self.topic.encode("ascii")
        n = len(records) // rs
        i = 0
        while i < n:
            # one chunk: consecutive batches up to VERIFY_CHUNK bytes (at least one batch)
            j = i
            chunk_end = pos
            while j < n:
                end = REC.unpack_from(records, j * rs)[0]
                if j > i and end - pos > VERIFY_CHUNK:
                    break
                chunk_end = end
                j += 1
            buf = current().pread(fd, chunk_end - pos, pos) if chunk_end > pos else b""
            self.nbytes += len(buf)
            base = pos
            for k in range(i, j):
                end, c = REC.unpack_from(records, k * rs)
                h = check_frame(buf, pos - base, end - base) if c > cum else None
                if h is None or h.frame_len != end - pos or h.count != c - cum or h.topic != topic:
                    # The log or its index is wrong here: a rebuild from the log tells which.
                    self.suspect.append(start)
                    self.checked.append((start, first, pos))
                    return
                pos, cum = end, c
            i = j
        self.checked.append((start, first, pos))

    def close(self) -> None:
        """Close the dup'ed fds (``run`` does it too).  Idempotent."""
        if not self._closed:
            self._closed = True
            close_quietly([fd for _, fd, _, _, _, _ in self._parts])


def records(p: Partition, i: int, k: int) -> bytes:
    """Raw index records ``i..k`` of ``p`` (file part with one pread, then pending)."""
    idx = p.idx
    rs = idx.rs
    out = b""
    if i < idx.n_file:
        top = min(k + 1, idx.n_file)
        out = os.pread(idx.fd, (top - i) * rs, idx.base + i * rs)
        if len(out) != (top - i) * rs:
            raise IndexDamaged(f"index of partition {p.start} shrank under the server")
        i = top
    if i <= k:
        out += bytes(idx.pending[(i - idx.n_file) * rs : (k + 1 - idx.n_file) * rs])
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
            parts.append((start, sys.dup(p.fd), a, p.idx.entry(i - 1)[1], records(p, i, k), p.idx.rs))
    except OSError as e:
        close_quietly([fd for _, fd, _, _, _, _ in parts])
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


def apply(job: VerifyJob, part_at: Callable[[int], Partition | None]) -> None:
    """Record a finished job's verified ranges (owning thread)."""
    for start, a, b in job.checked:
        p = part_at(start)
        if p is not None:
            p.mark_verified(a, b)
