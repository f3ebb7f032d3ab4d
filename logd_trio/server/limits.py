"""How many connections the server can afford, and who may open one.

File descriptors are the resource every part of the server shares: sockets,
partition and index files, the duplicates a sync, read or scrub job works on.
When connections take the last ones, an fsync cannot start and no batch
anywhere is acknowledged.  So at start the server raises its soft
``RLIMIT_NOFILE`` to the hard limit, sets aside a reserve for its own files
(sized from ``--topics`` and ``--partitions``), and admits at most as many
connections as the rest allows (fewer than ``--max-connections`` if need be,
said in the log).  :class:`Admission` applies that cap and the per-address cap
(``--max-connections-per-ip``); refused clients get ``ERR too many connections``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import trio

try:
    import resource
except ImportError:  # pragma: no cover - not on POSIX
    resource = None  # type: ignore[assignment]

__all__ = ["Admission", "FdBudget", "fd_budget", "raise_fd_limit"]

log = logging.getLogger("logd_trio.server.limits")

# Estimates of the descriptors each part holds at most (see docs/security.md).
FDS_BASE: Final = 32  # stdio, the event loop, Trio's wake-up socket, listeners, the lock file, log files
# Per partition: the .log, the .index and its read-only map; one more partition while rotating.
FDS_PER_PARTITION: Final = 3
# Per partition for background work: the scrub's or a read verification's duplicate.
FDS_PER_PARTITION_JOBS: Final = 1
# Per topic: its directory, and a sync job's duplicates (data + index of two partitions, the directory).
FDS_PER_TOPIC: Final = 6
# Per connection: its socket and the duplicate of the partition a READ is being sent from.
FDS_PER_CONNECTION: Final = 2
# Refused sockets kept open briefly so that the ERR reaches the client, plus the spare descriptor.
REFUSING_MAX: Final = 16
SPARE_FDS: Final = 1
# Below this many affordable connections the worst-case reserve is not applied (see fd_budget).
MIN_CONNECTIONS: Final = 16


@dataclass(frozen=True, slots=True)
class FdBudget:
    limit: int  # the soft RLIMIT_NOFILE the server runs with (0: unlimited)
    reserve: int  # descriptors kept for the server's own files and jobs
    max_connections: int  # connections admitted at most (<= --max-connections)
    # > 0: --topics x --partitions could need this many descriptors more than the limit has
    # (then a quarter of the limit goes to connections; files beyond the rest fail to open)
    shortfall: int = 0


def raise_fd_limit() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; the soft limit now in force (None: unlimited)."""
    if resource is None:  # pragma: no cover
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:  # e.g. an unlimited hard limit the kernel caps lower
            log.debug("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def fd_budget(limit: int | None, *, max_connections: int, topics: int, partitions: int) -> FdBudget:
    """Split ``limit`` descriptors between the server's own files and connections."""
    per_topic = FDS_PER_TOPIC + (partitions + 1) * FDS_PER_PARTITION + partitions * FDS_PER_PARTITION_JOBS
    reserve = FDS_BASE + REFUSING_MAX + SPARE_FDS + topics * per_topic
    if limit is None:
        return FdBudget(0, reserve, max_connections)
    affordable = (limit - reserve) // FDS_PER_CONNECTION
    if affordable >= MIN_CONNECTIONS:
        return FdBudget(limit, reserve, min(max_connections, affordable))
    # The worst case (every topic with every partition) does not fit: a --partitions much larger
    # than what retention ever keeps, or a tiny limit.  Serve anyway, and say so.
    share = max(1, limit // 4 // FDS_PER_CONNECTION)
    return FdBudget(limit, limit - share * FDS_PER_CONNECTION, min(max_connections, share),
                    shortfall=reserve + MIN_CONNECTIONS * FDS_PER_CONNECTION - limit)


T = TypeVar("T")  # hashable (a dict key)


class Admission(Generic[T]):
    """The open connections, by peer address, and the caps new ones must fit in."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address  # 0: no per-address cap
        self._open: dict[T, str] = {}
        self._per_address: collections.Counter[str] = collections.Counter()
        self._empty = trio.Event()
        self._empty.set()

    def refusal(self, address: str) -> str | None:
        """Why a new connection from ``address`` must be refused, or None to admit it."""
        if len(self._open) >= self.max_total:
            return f"{len(self._open)} connections open (the limit)"
        if self.max_per_address and self._per_address[address] >= self.max_per_address:
            return f"{self._per_address[address]} connections open from this address (the limit)"
        return None

    def add(self, item: T, address: str) -> None:
        self._open[item] = address
        self._per_address[address] += 1
        if self._empty.is_set():
            self._empty = trio.Event()

    def remove(self, item: T) -> None:
        address = self._open.pop(item, None)
        if address is None:
            return
        self._per_address[address] -= 1
        if not self._per_address[address]:
            del self._per_address[address]
        if not self._open:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._open))

    async def wait_empty(self) -> None:
        await self._empty.wait()
