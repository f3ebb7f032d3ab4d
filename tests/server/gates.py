"""Syscall layers that hold storage calls in their worker threads until a test releases them."""

from __future__ import annotations

import threading
from pathlib import Path

from logd_trio.server.storage.syscalls import Layer


class Gate(Layer):
    """While ``armed``, each gated call signals ``entered`` and waits (at most 20 s) for ``release``;
    ``once``: the first gated call disarms the gate."""

    def __init__(self, *, once: bool = False) -> None:
        super().__init__()
        self.once = once
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        if self.armed:
            if self.once:
                self.armed = False
            self.entered.set()
            self.release.wait(20)


class GatedSync(Gate):
    """Holds every fsync and fdatasync."""

    def fsync(self, fd: int) -> None:
        self.hold()
        self.inner.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self.hold()
        self.inner.fdatasync(fd)


class GatedUnlink(Gate):
    """Holds every unlink (the remover's worker thread)."""

    def unlink(self, path: Path) -> None:
        self.hold()
        self.inner.unlink(path)
