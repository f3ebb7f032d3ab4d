"""One partition's in-memory state, and the interval sets that track its verification."""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from pathlib import Path

from logd_trio.server.storage.files import O_CLOEXEC, close_quietly, index_path, log_path, remove_files
from logd_trio.server.storage.index import PartitionIndex, write_header

__all__ = ["Partition", "Ranges"]

_quiet = logging.getLogger(__name__)


class Ranges:
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


class Partition:
    """``<start>.log`` (open read-write as ``fd``) and its index."""

    __slots__ = ("bad", "cum", "fd", "generation", "idx", "newest", "size", "start", "synced_size", "vend",
                 "verified")

    def __init__(self, start: int, fd: int, idx: PartitionIndex, size: int, cum: int) -> None:
        self.start = start
        self.fd = fd
        self.idx = idx
        self.size = size  # bytes of valid frames
        self.cum = cum  # messages in the partition
        self.synced_size = size  # bytes covered by a captured SyncJob
        # Frames in [0, vend) come from an earlier process and were trusted through the index:
        # they are verified (CRC + framing) before being served; ``verified`` holds what was.
        self.vend = 0
        self.verified = Ranges()
        self.bad = Ranges()  # bytes that are not valid batches (found by a rebuild): never served
        self.generation = 0  # bumped when the index is rebuilt
        # Unix ms of the newest batch (its index record's time; the .log's mtime for a v1 index); 0: none
        self.newest = 0

    @classmethod
    def create(cls, directory: Path, start: int, file_mode: int) -> Partition:
        """New empty ``<start>.log`` and ``<start>.index`` (truncated if present; a v2 index).  Raises
        OSError; nothing is left behind then.  The caller fsyncs the directory."""
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_CLOEXEC
        fd = os.open(log_path(directory, start), flags, file_mode)
        ifd = -1
        try:
            ifd = os.open(index_path(directory, start), flags, file_mode)
            write_header(ifd)
        except OSError:
            close_quietly([fd, ifd] if ifd >= 0 else [fd])
            remove_files([log_path(directory, start), index_path(directory, start)], _quiet, "")
            raise
        p = cls(start, fd, PartitionIndex(ifd, 0), 0, 0)
        p.synced_size = 0
        return p

    def paths(self, directory: Path) -> list[Path]:
        """The partition's files, log first."""
        return [log_path(directory, self.start), index_path(directory, self.start)]

    @property
    def end(self) -> int:
        """Offset just past the partition's last batch."""
        return self.start + self.size

    def mark_verified(self, a: int, b: int) -> None:
        """Positions ``[a, b)`` passed verification; forget the bookkeeping once all of ``[0, vend)`` did."""
        if self.vend == 0:
            return
        self.verified.add(a, b)
        if not self.verified.missing(0, self.vend):
            self.vend = 0
            self.verified = Ranges()

    def unverified(self) -> list[tuple[int, int]]:
        return self.verified.missing(0, self.vend) if self.vend else []

    def close(self) -> None:
        """Close the log and index fds.  Idempotent enough: errors are ignored."""
        close_quietly([self.fd])
        self.idx.close()
