"""The ``--min-free-space`` guard: refuse appends that would leave too little room on the disk."""

from __future__ import annotations

import math
from pathlib import Path

from logd_trio.server.storage import syscalls

__all__ = ["FREE_SPACE_BYTES", "FREE_SPACE_PERIOD", "FreeSpace"]

# statvfs at most this often (seconds), or after this many bytes were appended.
FREE_SPACE_PERIOD = 0.1
FREE_SPACE_BYTES = 4 * 1024 * 1024


class FreeSpace:
    """Refuses appends that would leave less than ``minimum`` bytes free (0: never refuses)."""

    __slots__ = ("appended", "free", "minimum", "next_check", "path")

    def __init__(self, path: Path, minimum: int) -> None:
        self.path = path
        self.minimum = minimum
        self.free = 0
        self.appended = 0  # bytes appended since the last statvfs
        self.next_check = -math.inf

    def refuse(self, n: int, now: float) -> str | None:
        """The reason to refuse an append of ``n`` bytes at time ``now``, or None.  Cheap: statvfs is rate limited."""
        if not self.minimum:
            return None
        if now >= self.next_check or self.appended >= FREE_SPACE_BYTES:
            try:
                st = syscalls.current().statvfs(self.path)
            except OSError:
                return None  # cannot tell: the write itself will say
            self.free = st.f_bavail * st.f_frsize
            self.appended = 0
            self.next_check = now + FREE_SPACE_PERIOD
        free = self.free - self.appended
        if free - n < self.minimum:
            return f"disk nearly full ({max(free, 0)} bytes free, minimum {self.minimum})"
        self.appended += n
        return None
