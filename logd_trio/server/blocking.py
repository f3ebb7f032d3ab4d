"""Blocking storage work in a worker thread, the one way the server hands it off.

The current :mod:`~logd_trio.server.storage.syscalls` layer hears of each hand-off on
the event loop's thread before the thread starts and after it ends, so a test layer can
tell "the disk is working" without calling back into Trio from the worker thread (a call
that arrives only after the loop may already have gone idle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from logd_trio.server.storage import syscalls

__all__ = ["run_blocking"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def run_blocking(fn: Callable[[Unpack[Ts]], T], *args: *Ts, abandon_on_cancel: bool = False,
                       limiter: trio.CapacityLimiter | None = None) -> T:
    """``fn(*args)`` in a Trio worker thread (``trio.to_thread.run_sync``'s semantics)."""
    with syscalls.current().blocking():
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel, limiter=limiter)
