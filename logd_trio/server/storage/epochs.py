"""A topic's leader-epoch file: which leader epoch wrote the batches from which offset on.

Synchronous, no trio; every write is blocking (run it off the Trio thread).
The file ``<topic>/leader-epochs`` holds ``<epoch> <start_offset>`` lines:
epochs strictly increasing, start offsets non-decreasing.  A new entry is
written (whole file to a temporary, fsynced, renamed, directory fsynced)
before the first batch of its epoch is appended; truncating the log
truncates the file with it.  An epoch that wrote nothing is replaced by the
next one (same start offset), so restarts without writes do not pile up lines.
"""

from __future__ import annotations

import os
from pathlib import Path

from logd_trio.core.errors import StorageError
from logd_trio.server.storage.files import O_CLOEXEC, fsync_dir
from logd_trio.server.storage.syscalls import current

__all__ = ["EPOCHS_NAME", "EpochFile"]

EPOCHS_NAME = "leader-epochs"


def _parse(text: str, path: Path) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if len(words) != 2 or not all(w.isascii() and w.isdigit() for w in words):
            raise StorageError(f"{path} line {n}: expected '<epoch> <start_offset>', got {line!r}")
        epoch, start = int(words[0]), int(words[1])
        if out and (epoch <= out[-1][0] or start < out[-1][1]):
            raise StorageError(f"{path} line {n}: epoch {epoch} at {start} does not follow "
                               f"epoch {out[-1][0]} at {out[-1][1]}")
        out.append((epoch, start))
    return out


class EpochFile:
    """The entries of one topic's leader-epoch file, oldest first."""

    def __init__(self, directory: Path, entries: list[tuple[int, int]], file_mode: int) -> None:
        self.dir = directory
        self.path = directory / EPOCHS_NAME
        self.entries = entries
        self._mode = file_mode

    @classmethod
    def load(cls, directory: Path, file_mode: int = 0o600) -> EpochFile:
        """Read the file (absent: no entries).  Raises :class:`StorageError` on a malformed file."""
        path = directory / EPOCHS_NAME
        try:
            text = path.read_text("ascii")
        except FileNotFoundError:
            return cls(directory, [], file_mode)
        except (OSError, UnicodeDecodeError) as e:
            raise StorageError(f"cannot read {path}: {e}") from e
        return cls(directory, _parse(text, path), file_mode)

    @property
    def latest(self) -> int:
        """The newest epoch (0 when there is none)."""
        return self.entries[-1][0] if self.entries else 0

    def epoch_at(self, offset: int) -> int:
        """The epoch that wrote the batch at ``offset`` (0 before the first entry)."""
        epoch = 0
        for e, start in self.entries:
            if start > offset:
                break
            epoch = e
        return epoch

    def end_of(self, offset: int) -> int | None:
        """Where the epoch of the batch at ``offset`` ends (the next entry's start), None if it is the newest."""
        for _, start in self.entries:
            if start > offset:
                return start
        return None

    def assign(self, epoch: int, start: int) -> None:
        """Record that ``epoch`` writes from ``start`` on (durable when this returns); no-op if it already does."""
        if self.entries:
            last_epoch, last_start = self.entries[-1]
            if epoch == last_epoch:
                return
            if epoch < last_epoch or start < last_start:
                raise StorageError(f"epoch {epoch} at {start} does not follow epoch {last_epoch} at {last_start}")
            if start == last_start:  # the previous epoch wrote nothing here
                self._write([*self.entries[:-1], (epoch, start)])
                return
        self._write([*self.entries, (epoch, start)])

    def truncate(self, offset: int) -> None:
        """Forget the epochs that start at or after ``offset`` (the log was cut there)."""
        keep = [(e, s) for e, s in self.entries if s < offset]
        if keep != self.entries:
            self._write(keep)

    def _write(self, entries: list[tuple[int, int]]) -> None:
        data = "".join(f"{e} {s}\n" for e, s in entries).encode("ascii")
        tmp = self.dir / f".{EPOCHS_NAME}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, self._mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                current().fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            fsync_dir(self.dir)
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {e.strerror or e}") from e
        self.entries = entries
