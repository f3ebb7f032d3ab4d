"""The storage layer's seam to the operating system for the calls that decide durability.

Every ``fsync``, ``fdatasync``, ``dup``, ``pwrite``, ``write``, ``ftruncate`` and
``unlink`` the storage code makes, and the ``pread`` of frame verification, go
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
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

__all__ = ["Layer", "Syscalls", "current", "install"]

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


_current: Syscalls = Syscalls()

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
