"""One server per data directory: an exclusive ``flock`` on the directory itself.

Taken before any topic is opened and held for the server's whole life; the
kernel releases it when the process ends, however it ends, so a crashed server
leaves nothing to clean up.  The lock is on the directory's own descriptor, so
removing a file cannot undo it.  ``<workdir>/logd.lock`` holds the holder's pid
(information for a second server's message) and is flocked as well, so that a
server of an earlier version, which locked only that file, is excluded too.
``flock`` is only as good as the file system's: on NFS it may be local to one
host (see docs/security.md).
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
_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)


class DataDirLocked(LogdError):
    """Another process holds the data directory."""


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class DataDirLock:
    """The held lock; :meth:`release` (or the end of the process) gives it up."""

    def __init__(self, dir_fd: int, fd: int, path: Path) -> None:
        self.dir_fd = dir_fd
        self.fd = fd  # the pid file's
        self.path = path

    @classmethod
    def acquire(cls, root: Path, file_mode: int = 0o600) -> DataDirLock:
        """Take the lock (blocking file system calls: run off the Trio thread).

        Raises :class:`DataDirLocked` naming the directory and the holder's pid when another
        process holds it, ``OSError`` when the directory or the pid file cannot be opened.
        """
        path = Path(root) / LOCK_NAME
        dir_fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
        fd = -1
        try:
            if _try_flock(dir_fd):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _CLOEXEC, file_mode)
                locked = _try_flock(fd)
            else:  # the pid file is only read (it may be gone: the lock does not depend on it)
                with contextlib.suppress(OSError):
                    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
                locked = False
            if not locked:
                holder = _read_pid(fd) if fd >= 0 else None
                who = f"pid {holder}" if holder is not None else "another process"
                raise DataDirLocked(
                    f"data directory {os.path.abspath(root)} is in use by another server ({who}); "
                    f"one directory serves one server")
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.close(dir_fd)
            raise
        return cls(dir_fd, fd, path)

    def release(self) -> None:
        """Unlock and close.  The pid stays in the file (harmless: only the flocks count).  Idempotent."""
        if self.dir_fd < 0:
            return
        fds, self.dir_fd, self.fd = (self.fd, self.dir_fd), -1, -1
        for fd in fds:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
