"""Work a :class:`~logd_trio.server.storage.topic_log.TopicLog` hands out to run elsewhere.

Each job is built on the log's owning thread and owns what it needs (dup'ed
fds, paths, closed-off partitions), so its blocking ``run`` may go to a worker
thread while the log keeps appending, rotating and planning reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from logd_trio.core.errors import StorageError
from logd_trio.server.storage.files import close_quietly, remove_files
from logd_trio.server.storage.partition import Partition
from logd_trio.server.storage.syscalls import current

__all__ = ["FilesGone", "RemoveJob", "SyncJob", "capture"]


class SyncJob:
    """Everything appended up to ``upto`` and not yet fsynced; owns dup'ed fds.

    Run jobs one at a time, in capture order: a job's ``upto`` guarantee
    assumes the previous jobs have completed.
    """

    __slots__ = ("_data_fds", "_dir_fd", "_done", "_index_fds", "_on_done", "_paths", "unlinked", "upto")

    def __init__(self, upto: int, data_fds: list[int], paths: list[Path], index_fds: list[int],
                 dir_fd: int | None, on_done: Callable[[int], None]) -> None:
        self.upto = upto
        self._data_fds = data_fds
        self._paths = paths  # of the data fds: checked to be still theirs
        self.unlinked: list[Path] = []
        self._index_fds = index_fds
        self._dir_fd = dir_fd
        self._on_done: Callable[[int], None] | None = on_done
        self._done = False

    def _fds(self) -> list[int]:
        return self._data_fds + self._index_fds + ([] if self._dir_fd is None else [self._dir_fd])

    def run(self) -> None:
        """fdatasync the partitions (data, then index), fsync the dir; close the dups.

        Raises the :class:`OSError` if a sync fails (the dups are closed
        anyway); the covered batches are then not durable (on Linux a failed
        fsync cannot be meaningfully retried).  ``unlinked`` then lists the
        synced partition files whose path no longer names them (removed or
        replaced: what was written there is not where a restart will look).
        A second call does nothing.
        """
        if self._done:
            return
        self._done = True
        sys = current()
        try:
            for fd in self._data_fds:
                sys.fdatasync(fd)
            for fd in self._index_fds:
                sys.fdatasync(fd)
            if self._dir_fd is not None:
                sys.fsync(self._dir_fd)
            self.unlinked = [path for fd, path in zip(self._data_fds, self._paths, strict=True)
                             if not _linked(fd, path)]
        finally:
            close_quietly(self._fds())
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self.upto)

    def close(self) -> None:
        """Drop the job without syncing (closes the dups).  Idempotent."""
        if not self._done:
            self._done = True
            self._on_done = None
            close_quietly(self._fds())


class FilesGone(StorageError):
    """A partition file was removed or replaced under the server (``path``: where it was)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"partition file {path.name} was removed or replaced under the server")
        self.path = path


def _linked(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    st = os.fstat(fd)
    if st.st_nlink == 0:
        return False
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def capture(topic: str, upto: int, data: list[Partition], index: list[Partition], dir_fd: int | None,
            paths: list[Path], on_done: Callable[[int], None]) -> SyncJob:
    """A job fsyncing the ``data`` partitions' logs (``paths``), the ``index`` partitions' indexes
    and ``dir_fd`` (if not None), on dup'ed fds; marks what it covers as synced.  Raises
    :class:`StorageError` (chained) if an fd cannot be duplicated (nothing is marked then)."""
    dup = current().dup
    data_fds: list[int] = []
    index_fds: list[int] = []
    try:
        for p in data:
            data_fds.append(dup(p.fd))
        for p in index:
            index_fds.append(dup(p.idx.fd))
        dir_dup = dup(dir_fd) if dir_fd is not None else None
    except OSError as e:
        close_quietly(data_fds + index_fds)
        raise StorageError(f"topic {topic}: cannot capture sync job: {e.strerror or type(e).__name__}") from e
    for p in data:
        p.synced_size = p.size
    for p in index:
        p.idx.synced_n = p.idx.n_file
    return SyncJob(upto, data_fds, paths, index_fds, dir_dup, on_done)


class RemoveJob:
    """Partitions retention dropped: close their fds and unlink their files, oldest first.

    Closing the last fd of a multi-GB unlinked file frees its blocks, which
    takes long: run it in a worker thread.  The partitions are already out of
    the log, so no new read can plan them (open plans hold their own dups).
    """

    __slots__ = ("_log", "_parts", "_paths", "_topic")

    def __init__(self, parts: list[Partition], paths: list[Path], topic: str, log: logging.Logger) -> None:
        self._parts = parts
        self._paths = paths
        self._topic = topic
        self._log = log

    @property
    def paths(self) -> list[Path]:
        return list(self._paths)

    def run(self) -> None:
        """Blocking; never raises for a file that cannot be removed (it is logged)."""
        parts, self._parts = self._parts, []
        paths, self._paths = self._paths, []
        remove_files(paths, self._log, self._topic)
        for p in parts:
            p.close()
