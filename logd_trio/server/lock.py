"""One server per data directory: an exclusive ``flock`` on ``<workdir>/logd.lock``.

Taken before any topic is opened and held for the server's whole life; the
kernel releases it when the process ends, however it ends, so a crashed server
leaves nothing to clean up.  The holder writes its pid into the file, so that a
second server can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Final

from logd_trio.core.errors import LogdError

__all__ = ["LOCK_NAME", "DataDirLock", "DataDirLocked"]

LOCK_NAME: Final = "logd.lock"


class DataDirLocked(LogdError):
    """Another process holds the data directory."""


class DataDirLock:
    """The held lock; :meth:`release` (or the end of the process) gives it up."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, root: Path, file_mode: int = 0o600) -> DataDirLock:
        """Take the lock (blocking file system calls: run off the Trio thread).

        Raises :class:`DataDirLocked` naming the directory and the holder's pid when another
        process holds it, ``OSError`` when the lock file cannot be opened.
        """
        path = Path(root) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), file_mode)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                who = f"pid {holder}" if holder is not None else "another process"
                raise DataDirLocked(
                    f"data directory {os.path.abspath(root)} is in use by another server ({who}); "
                    f"one directory serves one server") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def release(self) -> None:
        """Unlock and close.  The pid stays in the file (harmless: only the flock counts).  Idempotent."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
