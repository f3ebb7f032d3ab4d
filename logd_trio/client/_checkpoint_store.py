"""What the database state handlers share: argument checks and a bounded worker-thread runner.

The Postgres and Redis handlers use well-kept *sync* drivers in worker
threads (``anyio.to_thread``), because their async clients run on asyncio
only and the client library runs on Trio and asyncio alike.

:class:`ThreadedStore` owns one driver connection at a time (a *slot*).  Each
call runs in a worker thread that holds the slot's lock, and the caller waits
at most ``timeout`` seconds.  A call that does not finish in time (a database
that is alive but silent) or whose caller is cancelled is abandoned: its slot
is retired, so the next call opens a fresh connection instead of queueing
behind the stuck one, and the stuck thread closes the retired connection when
it returns.  Each store has its own small thread limiter, so a stalled
database never takes the process's shared worker threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
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
THREADS_PER_STORE = 4


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


class Slot(Generic[C]):
    """One driver connection, used by one worker thread at a time (under ``lock``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: C | None = None
        self.retired = False


class ThreadedStore(Generic[C]):
    """Base of the database checkpoints: runs blocking driver calls as described above."""

    def __init__(self, *, what: str, timeout: float) -> None:
        self.what = what
        self.timeout = check_timeout(timeout)
        self._slot: Slot[C] = Slot()
        self._limiter = anyio.CapacityLimiter(THREADS_PER_STORE)
        self._closed = False

    # --------------------------------------------------------- for subclasses

    def _close_conn(self, conn: C) -> None:
        """Close a driver connection (must not block for long)."""
        raise NotImplementedError

    def drop(self, slot: Slot[C]) -> None:
        """Forget the slot's connection (after an error, or when retired); the next call reconnects."""
        conn, slot.conn = slot.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                self._close_conn(conn)

    async def call(self, fn: Callable[[Slot[C]], T]) -> T:
        """Run ``fn(slot)`` in a worker thread with the slot's lock held; at most ``timeout`` seconds."""
        if self._closed:
            raise CheckpointError(f"{self.what} is closed")
        state: dict[str, Slot[C] | bool] = {}

        def work() -> T:
            deadline = time.monotonic() + self.timeout
            while True:
                slot = self._slot
                if not slot.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise CheckpointError(f"{self.what} is busy: an earlier call did not return")
                if state.get("gone"):  # the caller gave up while this thread waited
                    slot.lock.release()
                    raise CheckpointError(f"{self.what}: call abandoned")
                if not slot.retired:
                    break
                slot.lock.release()
            state["slot"] = slot
            try:
                return fn(slot)
            finally:
                state["finished"] = True
                if slot.retired:
                    self.drop(slot)
                slot.lock.release()

        with anyio.move_on_after(self.timeout):
            try:
                return await anyio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=self._limiter)
            finally:
                state["gone"] = True
                started = state.get("slot")
                if isinstance(started, Slot) and not state.get("finished"):
                    self._retire(started)  # timed out or cancelled while the thread still runs
        raise CheckpointError(f"{self.what} did not answer within {self.timeout:g} s")

    def _retire(self, slot: Slot[C]) -> None:
        slot.retired = True
        if self._slot is slot:
            self._slot = Slot()
        if slot.lock.acquire(blocking=False):  # the thread finished meanwhile: close here
            try:
                self.drop(slot)
            finally:
                slot.lock.release()
        # else the thread still runs and drops the connection when it returns

    async def aclose(self) -> None:
        """Close the connection; later calls raise :class:`CheckpointError`."""
        if not self._closed:
            self._closed = True
            self._retire(self._slot)
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
