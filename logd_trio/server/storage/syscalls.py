"""The storage layer's seam to the operating system for the calls that decide durability.

Every ``fsync``, ``fdatasync``, ``dup``, ``pwrite``, ``write``, ``ftruncate`` and
``unlink`` the storage code makes, the ``pread`` of frame verification and the
``statvfs`` of the free-space guard go
through :func:`current`, so that a test (or an operator's
diagnostic build) can fail, record or slow them down without patching
:mod:`os` for the whole process::

    class FailingSync(Layer):
        def fdatasync(self, fd: int) -> None:
            raise OSError(errno.EIO, "injected")

    with install(FailingSync()):
        ...

A :class:`Layer` forwards every call it does not override to the layer that
was current when it was installed, so layers stack (a slow disk under an
injected fault).  Installing and removing happen on one thread; worker threads
only call through :func:`current`.

Test-only hook: when the environment variable ``LOGD_TEST_SLOW_DISK`` (a delay
such as ``60ms`` or ``0.2s``) is set as this module is first imported, a
:class:`SlowDisk` layer starts out installed, so that a server *process* a test
spawns has a slow disk too (the test suite's ``--slow-disk``).  Unset, the
module costs nothing more.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

__all__ = ["SLOW_DISK_ENV", "Layer", "SlowDisk", "Syscalls", "current", "install", "parse_delay"]

_Buf = bytes | bytearray | memoryview


class Syscalls:
    """The real calls."""

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def dup(self, fd: int) -> int:
        return os.dup(fd)

    def pwrite(self, fd: int, data: _Buf, pos: int) -> int:
        return os.pwrite(fd, data, pos)

    def write(self, fd: int, data: _Buf) -> int:
        return os.write(fd, data)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def pread(self, fd: int, n: int, pos: int) -> bytes:
        return os.pread(fd, n, pos)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def statvfs(self, path: Path) -> os.statvfs_result:
        return os.statvfs(path)

    def blocking(self) -> contextlib.AbstractContextManager[None]:
        """Entered on the event loop's thread around storage work handed to a worker thread
        (see :func:`logd_trio.server.blocking.run_blocking`): a layer may watch it begin and end."""
        return contextlib.nullcontext()


class Layer(Syscalls):
    """A :class:`Syscalls` that forwards to ``inner`` (set by :func:`install`)."""

    inner: Syscalls

    def __init__(self) -> None:
        self.inner = Syscalls()

    def fsync(self, fd: int) -> None:
        self.inner.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self.inner.fdatasync(fd)

    def dup(self, fd: int) -> int:
        return self.inner.dup(fd)

    def pwrite(self, fd: int, data: _Buf, pos: int) -> int:
        return self.inner.pwrite(fd, data, pos)

    def write(self, fd: int, data: _Buf) -> int:
        return self.inner.write(fd, data)

    def ftruncate(self, fd: int, length: int) -> None:
        self.inner.ftruncate(fd, length)

    def pread(self, fd: int, n: int, pos: int) -> bytes:
        return self.inner.pread(fd, n, pos)

    def unlink(self, path: Path) -> None:
        self.inner.unlink(path)

    def statvfs(self, path: Path) -> os.statvfs_result:
        return self.inner.statvfs(path)

    def blocking(self) -> contextlib.AbstractContextManager[None]:
        return self.inner.blocking()


class SlowDisk(Layer):
    """Every fsync/fdatasync takes ``delay`` seconds longer (real time): for tests."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def fsync(self, fd: int) -> None:
        time.sleep(self.delay)
        self.inner.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        time.sleep(self.delay)
        self.inner.fdatasync(fd)


SLOW_DISK_ENV = "LOGD_TEST_SLOW_DISK"
_DELAY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s)")


def parse_delay(text: str) -> float:
    """``60ms`` or ``0.2s`` -> seconds."""
    m = _DELAY.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a delay like 60ms or 0.2s")
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


def _initial() -> Syscalls:
    value = os.environ.get(SLOW_DISK_ENV, "")
    if not value:
        return Syscalls()
    try:
        return SlowDisk(parse_delay(value))
    except ValueError as e:
        raise ValueError(f"{SLOW_DISK_ENV}: {e}") from None


_current: Syscalls = _initial()

L = TypeVar("L", bound=Layer)


def current() -> Syscalls:
    """The calls storage uses now."""
    return _current


@contextlib.contextmanager
def install(layer: L) -> Iterator[L]:
    """Make ``layer`` current (on top of the current one) until the block ends."""
    global _current
    layer.inner, _current = _current, layer
    try:
        yield layer
    finally:
        _current = layer.inner
