"""What the database state handlers share: argument checks and a bounded worker-thread runner.

The Postgres and Redis handlers use well-kept *sync* drivers in worker
threads (``anyio.to_thread``), because their async clients run on asyncio
only and the client library runs on Trio and asyncio alike.

:class:`ThreadedStore` owns one driver connection at a time (a *slot*).  Calls
take turns (one connection serves one statement at a time); each runs in a
worker thread and its caller waits at most ``timeout`` seconds in all.  A
call that does not finish in time (a database that is alive but silent) or
whose caller is cancelled is abandoned: its slot is retired, so the next call
opens a fresh connection instead of queueing behind the stuck one, the stuck
thread is woken (the handler shuts its socket down where the driver has no
read timeout of its own) and the retired connection is closed by whichever
of the thread and the caller is last.  Each store runs at most
``MAX_STUCK + 1`` threads, the same under every event loop: while
``MAX_STUCK`` abandoned threads still run, calls fail at once with
:class:`CheckpointUnavailable`.  All handover state is kept under one lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Generic, Self, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from logd_trio.client.checkpoint import Position
from logd_trio.core.errors import CheckpointError

C = TypeVar("C")
T = TypeVar("T")

MAX_POSITION = 2**63 - 1  # positions are stored as signed 64-bit integers (Postgres bigint)
MAX_CONSUMER = 200
MAX_STUCK = 2  # abandoned calls whose thread still runs; then calls fail at once


def check_consumer(consumer: str) -> str:
    """A consumer name: 1..200 printable characters, no whitespace."""
    if not isinstance(consumer, str) or not 1 <= len(consumer) <= MAX_CONSUMER:
        raise ValueError(f"consumer name must be a string of 1..{MAX_CONSUMER} characters, not {consumer!r}")
    if not consumer.isprintable() or any(c.isspace() for c in consumer):
        raise ValueError(f"consumer name {consumer!r} must be printable characters without whitespace")
    return consumer


def check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"topic must be a non-empty string, not {topic!r}")
    return topic


def check_position(position: Position) -> Position:
    if not isinstance(position, Position):
        raise TypeError(f"position must be a Position, not {type(position).__name__}")
    for name, value in (("offset", position.offset), ("delta", position.delta)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_POSITION:
            raise ValueError(f"position {name} must be an integer in 0..2**63-1, not {value!r}")
    return position


def check_timeout(timeout: float) -> float:
    if not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ValueError(f"timeout must be in (0, 3600] seconds, not {timeout!r}")
    return float(timeout)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CheckpointUnavailable(CheckpointError):
    """The database is down, unreachable or silent: the call may succeed later, unchanged.

    Other :class:`CheckpointError` s (a closed store, a missing table or privilege, a corrupt stored
    value) need someone to act."""


class Slot(Generic[C]):
    """One driver connection, used by one worker thread at a time (``busy``, under the store's lock)."""

    def __init__(self) -> None:
        self.conn: C | None = None
        self.busy = False
        self.retired = False


class _Call(Generic[C]):
    """The handover between one caller and its worker thread (under the store's lock)."""

    def __init__(self) -> None:
        self.gone = False  # the caller stopped waiting
        self.started = False  # the thread took a slot
        self.finished = False  # the thread is done with it
        self.stuck = False  # counted in ThreadedStore._stuck
        self.slot: Slot[C] | None = None


def shutdown_socket(fd: int) -> None:
    """Make a thread blocked on socket ``fd`` return (its recv sees end of file), without closing ``fd``."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()


class ThreadedStore(Generic[C]):
    """Base of the database checkpoints: runs blocking driver calls as described above."""

    def __init__(self, *, what: str, timeout: float) -> None:
        self.what = what
        self.timeout = check_timeout(timeout)
        self._cv = threading.Condition()  # guards every slot's fields, _slot, _closed, _stuck and the _Calls
        self._slot: Slot[C] = Slot()
        self._closed = False
        self._stuck = 0
        self._turn = anyio.CapacityLimiter(1)  # callers take turns: one connection, one statement at a time
        self._pool = anyio.CapacityLimiter(MAX_STUCK + 1)  # this store's threads, never the shared ones

    @property
    def stuck_calls(self) -> int:
        """Abandoned calls whose worker thread has not returned yet (at most ``MAX_STUCK``)."""
        return self._stuck

    # --------------------------------------------------------- for subclasses

    def _close_conn(self, conn: C) -> None:
        """Close a driver connection (must not block for long)."""
        raise NotImplementedError

    def _interrupt(self, conn: C) -> None:
        """Wake a thread blocked on ``conn`` (called with the store's lock held, so quick; none by default:
        a driver with its own read timeout returns within ``timeout`` anyway)."""

    def _close_quietly(self, conn: C | None) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                self._close_conn(conn)

    def stopped(self, slot: Slot[C]) -> None:
        """In the worker thread: raise when the call was abandoned or the store closed (no retry then)."""
        if slot.retired:
            raise CheckpointError(f"{self.what} is closed" if self._closed else f"{self.what}: call abandoned")

    def attach(self, slot: Slot[C], conn: C) -> C:
        """In the worker thread: make a new connection the slot's, unless the call was abandoned meanwhile."""
        with self._cv:
            if not slot.retired:
                slot.conn = conn
                return conn
        self._close_quietly(conn)
        self.stopped(slot)
        raise AssertionError("unreachable")  # pragma: no cover

    def drop(self, slot: Slot[C]) -> None:
        """Forget the slot's connection (after an error); the next call reconnects."""
        with self._cv:
            conn, slot.conn = slot.conn, None
        self._close_quietly(conn)

    # --------------------------------------------------------- running calls

    async def call(self, fn: Callable[[Slot[C]], T]) -> T:
        """Run ``fn(slot)`` in a worker thread that has the slot to itself; at most ``timeout`` seconds."""
        self._admit()
        call: _Call[C] = _Call()

        def work() -> T:
            with self._cv:
                while True:
                    if self._closed:
                        raise CheckpointError(f"{self.what} is closed")
                    if call.gone:
                        raise CheckpointError(f"{self.what}: call abandoned")
                    slot = self._slot  # never a retired one while the store is open
                    if not slot.busy:
                        break
                    self._cv.wait()  # woken when the slot is free or retired, or the store closed
                slot.busy, call.started, call.slot = True, True, slot
            try:
                return fn(slot)
            finally:
                with self._cv:
                    slot.busy, call.finished = False, True
                    if call.stuck:
                        call.stuck = False
                        self._stuck -= 1
                    conn = None
                    if slot.retired:
                        conn, slot.conn = slot.conn, None
                    self._cv.notify_all()
                self._close_quietly(conn)

        with anyio.move_on_after(self.timeout):
            try:
                async with self._turn:
                    self._admit()  # again: calls that queued for their turn may have got stuck meanwhile
                    return await anyio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=self._pool)
            finally:
                self._leave(call)
        raise CheckpointUnavailable(f"{self.what} did not answer within {self.timeout:g} s")

    def _admit(self) -> None:
        with self._cv:
            if self._closed:
                raise CheckpointError(f"{self.what} is closed")
            if self._stuck >= MAX_STUCK:
                raise CheckpointUnavailable(
                    f"{self.what} is not answering: {self._stuck} earlier calls still wait for it")

    def _leave(self, call: _Call[C]) -> None:
        """The caller stops waiting: a thread still running is abandoned and its slot retired."""
        with self._cv:
            call.gone = True
            self._cv.notify_all()
            if call.slot is None or call.finished:
                return
            call.stuck = True
            self._stuck += 1
            conn = self._retire(call.slot)
        self._close_quietly(conn)

    def _retire(self, slot: Slot[C]) -> C | None:
        """With the lock held: no call takes ``slot`` any more; returns its connection for the caller to
        close when no thread uses it, else wakes that thread, which closes it when it returns."""
        slot.retired = True
        if self._slot is slot and not self._closed:
            self._slot = Slot()
        self._cv.notify_all()
        if not slot.busy:
            conn, slot.conn = slot.conn, None
            return conn
        if slot.conn is not None:
            with contextlib.suppress(Exception):
                self._interrupt(slot.conn)
        return None

    async def aclose(self) -> None:
        """Close the connection and stop the call running on it; later calls raise :class:`CheckpointError`."""
        conn = None
        with self._cv:
            if not self._closed:
                self._closed = True
                conn = self._retire(self._slot)
        self._close_quietly(conn)
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
