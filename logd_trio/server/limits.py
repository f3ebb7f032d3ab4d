"""How many connections the server can afford, and who may open one.

File descriptors are the resource every part of the server shares: sockets,
partition and index files, the duplicates a sync, read or scrub job works on.
When connections take the last ones, an fsync cannot start and no batch
anywhere is acknowledged.  So at start the server raises its soft
``RLIMIT_NOFILE`` to the hard limit, sets aside a reserve for its own files
(sized from ``--topics`` and ``--partitions``), and admits at most as many
connections as the rest allows (fewer than ``--max-connections`` if need be,
said in the log).  :class:`Admission` applies that cap and the per-address cap
(``--max-connections-per-ip``; loopback clients are exempt from it); refused
clients get ``ERR too many connections``.

Two parts of the reserve are held, not just counted, so that a miscount or a
leak elsewhere cannot take them: each topic keeps :data:`SYNC_RESERVE_FDS`
descriptors open on ``/dev/null`` and closes them just before it duplicates
its files for an fsync (:class:`TopicFds`); and READ plans beyond their first
partition draw on one server-wide :class:`ReadFdPool`, so a slow reader never
holds more than its budget.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import trio

from logd_trio.server.storage.jobs import SyncJob
from logd_trio.server.storage.reads import ReadPlan

try:
    import resource
except ImportError:  # pragma: no cover - not on POSIX
    resource = None  # type: ignore[assignment]

__all__ = ["Admission", "FdBudget", "ReadFdPool", "Throttled", "TopicFds", "fd_budget", "is_loopback",
           "open_null", "raise_fd_limit"]

log = logging.getLogger("logd_trio.server.limits")

# Estimates of the descriptors each part holds at most (see docs/security.md).
FDS_BASE: Final = 32  # stdio, the event loop, Trio's wake-up socket, listeners, the lock file, log files
# Per partition: the .log, the .index and its read-only map; one more partition while rotating.
FDS_PER_PARTITION: Final = 3
# Per partition for background work: the scrub's or a read verification's duplicate.
FDS_PER_PARTITION_JOBS: Final = 1
# Per topic: its directory, and a sync job's duplicates (data + index of two partitions, the directory),
# which the topic holds open in advance (SYNC_RESERVE_FDS).
SYNC_RESERVE_FDS: Final = 5
FDS_PER_TOPIC: Final = 1 + SYNC_RESERVE_FDS
# Per connection: its socket and the duplicate of the first partition a READ reply is sent from.
FDS_PER_CONNECTION: Final = 2
# Server-wide: the duplicates of the further partitions READ replies span (ReadFdPool).  A READ that
# finds the pool empty is answered from one partition ("up to" its limit, as the protocol allows).
READ_POOL_FDS: Final = 32
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


# When the hard limit is unlimited, macOS refuses a soft limit above OPEN_MAX (10240): try this then.
FALLBACK_LIMIT: Final = 10240


def raise_fd_limit() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; the soft limit now in force (None: unlimited)."""
    if resource is None:  # pragma: no cover
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        targets = [hard]
        if _number(hard) > FALLBACK_LIMIT > _number(soft):
            targets.append(FALLBACK_LIMIT)
        for target in targets:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                break
            except (ValueError, OSError) as e:  # e.g. an unlimited hard limit the kernel caps lower
                log.debug("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _number(limit: int) -> float:
    return math.inf if resource is None or limit == resource.RLIM_INFINITY else limit


def fd_budget(limit: int | None, *, max_connections: int, topics: int, partitions: int,
              http_connections: int = 0) -> FdBudget:
    """Split ``limit`` descriptors between the server's own files and connections
    (``http_connections``: the monitoring server's cap, when it runs)."""
    per_topic = FDS_PER_TOPIC + (partitions + 1) * FDS_PER_PARTITION + partitions * FDS_PER_PARTITION_JOBS
    reserve = FDS_BASE + REFUSING_MAX + SPARE_FDS + READ_POOL_FDS + http_connections + topics * per_topic
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
        self.max_per_address = max_per_address  # 0: no per-address cap; loopback peers are exempt
        self._open: dict[T, str] = {}
        self._per_address: collections.Counter[str] = collections.Counter()
        self._empty = trio.Event()
        self._empty.set()

    def refusal(self, address: str) -> str | None:
        """Why a new connection from ``address`` must be refused, or None to admit it."""
        if len(self._open) >= self.max_total:
            return f"{len(self._open)} connections open (the limit)"
        if (self.max_per_address and self._per_address[address] >= self.max_per_address
                and not is_loopback(address)):  # local clients all share 127.0.0.1: only the total cap
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


def is_loopback(address: str) -> bool:
    """``address`` (a peer's IP, possibly with a zone) is on this host's loopback."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def open_null() -> int | None:
    """A descriptor on ``/dev/null`` (close-on-exec) to hold a slot, or None when none is free."""
    try:
        return os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


class Throttled:
    """A log line at most once per ``period``; it says how many were held back."""

    def __init__(self, logger: logging.Logger, level: int, period: float = 10.0) -> None:
        self.logger = logger
        self.level = level
        self.period = period
        self._next = -math.inf
        self._held = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = trio.current_time()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            msg += " (%d more like it since the last report)"
            args = (*args, self._held)
        self.logger.log(self.level, msg, *args)
        self._next = now + self.period
        self._held = 0


class ReadFdPool:
    """The descriptors READ plans may hold for partitions beyond their first, server-wide."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held = 0

    def max_partitions(self) -> int:
        """How many partitions the next plan may cover (at least its first)."""
        return 1 + max(0, self.size - self.held)

    def hold(self, plan: ReadPlan) -> ReadPlan:
        """Count ``plan``'s further partitions until it closes."""
        extra = max(0, len(plan.segments) - 1)
        if extra:
            self.held += extra

            def give_back(_: ReadPlan) -> None:
                self.held -= extra

            plan.on_close = give_back
        return plan


SYNC_RETRY_MIN: Final = 0.05
SYNC_RETRY_MAX: Final = 2.0


class TopicFds:
    """One topic's claim on descriptors: a held reserve its sync jobs' duplicates take the slots of,
    the pause (growing, logged at most every 10 s) before it tries a sync that could not start again,
    and the server's :class:`ReadFdPool`.  The default (a topic outside a server) holds nothing and
    lets a READ span any number of partitions."""

    def __init__(self, reserve: int = 0, reads: ReadFdPool | None = None) -> None:
        self.size = reserve
        self.reads = reads
        self._held: list[int] = []
        self._pause = SYNC_RETRY_MIN
        self._report = Throttled(log, logging.ERROR)
        self.refill()

    def refill(self) -> None:
        while len(self._held) < self.size and (fd := open_null()) is not None:
            self._held.append(fd)

    def max_partitions(self) -> int | None:
        return None if self.reads is None else self.reads.max_partitions()

    def hold(self, plan: ReadPlan) -> ReadPlan:
        return plan if self.reads is None else self.reads.hold(plan)

    @contextlib.contextmanager
    def for_sync(self) -> Iterator[None]:
        """Free the reserve for the duplicates a sync job makes in the block (on the Trio thread,
        so no other task takes the slots first); then hold what is free again."""
        self.refill()  # the slots the last job's duplicates had, if still free
        held, self._held = self._held, []
        for fd in held:
            os.close(fd)
        try:
            yield
            self._pause = SYNC_RETRY_MIN
        finally:
            self.refill()

    def run_job(self, job: SyncJob) -> None:
        """Run ``job`` (in a worker thread); then hold the slots its duplicates had again at once."""
        try:
            job.run()
        finally:
            self.refill()

    async def sync_retry(self, topic: str, error: BaseException) -> None:
        """A sync job could not be captured (nothing synced, nothing lost): report, then pause."""
        self._report("topic %s: cannot start an fsync, retrying in %.2gs: %s", topic, self._pause, error)
        await trio.sleep(self._pause)
        self._pause = min(self._pause * 2, SYNC_RETRY_MAX)

    def close(self) -> None:
        held, self._held, self.size = self._held, [], 0
        for fd in held:
            os.close(fd)
