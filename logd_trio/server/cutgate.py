"""One topic's log cut (a deposed leader truncating its unacknowledged tail, the blocking part in a
worker thread) kept apart from the log's other users on the Trio thread: reads being planned or
verified, and the scrub.  They change or read the partitions' lists, sizes and indexes that the
cut rewrites, so a cut waits until none is inside, and none enters until it is over.

Cheap for the users: entering is a counter (and a wait only while a cut is coming or running).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

__all__ = ["CutGate"]

T = TypeVar("T")


class CutGate:
    def __init__(self) -> None:
        self.users = 0
        self._cut: trio.Event | None = None  # set once the cut coming or running is over
        self._drained: trio.Event | None = None  # the cut waits on it for the users inside

    async def use(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` as a user of the log: never while a cut runs."""
        while self._cut is not None:
            await self._cut.wait()
        self.users += 1
        try:
            return await fn()
        finally:
            self.users -= 1
            if not self.users and self._drained is not None:
                self._drained.set()

    async def cut(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` alone: once the users inside have left; new ones wait until it returns."""
        while self._cut is not None:
            await self._cut.wait()
        self._cut = over = trio.Event()
        try:
            while self.users:
                self._drained = trio.Event()
                await self._drained.wait()
            self._drained = None
            return await fn()
        finally:
            self._cut = self._drained = None
            over.set()
