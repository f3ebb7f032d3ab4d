"""A node's etcd session: one lease, kept alive by one task, with its deadline.

Everything the node puts in etcd that must vanish when the node does (its member
key, its leader key) is put on this lease.  The keepalive task renews every
``ttl / 3``; each attempt is bounded, and a failed one is retried every
``ttl / 10``.  The deadline bookkeeping (fencing.LeaseClock) counts from each
keepalive's send time.  When etcd says the lease is gone, ``lost`` is set and the
session is over: the node must open a new one (and is no longer leader).

Lease time is Trio's clock (CLOCK_MONOTONIC, which stops while the machine is
suspended) plus the time spent suspended since the process started
(CLOCK_BOOTTIME minus CLOCK_MONOTONIC, where the system has it): etcd's lease
keeps running through a suspend (etcd runs elsewhere), so after waking up a
leader must see that its lease time has passed, not carry on as if no time had.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.etcd_wire import EtcdException, LeaseNotFound
from logd_trio.server.cluster.fencing import LeaseClock

__all__ = ["Renew", "Session", "open_session", "suspended_time"]

Renew = Callable[[int], Awaitable[int]]  # lease id -> granted TTL; raises LeaseNotFound
_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def _suspend_offset() -> float:
    return 0.0 if _BOOTTIME is None else time.clock_gettime(_BOOTTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)


_OFFSET_AT_START = _suspend_offset()


def suspended_time() -> float:
    """Seconds this machine spent suspended since the process started (0 without
    CLOCK_BOOTTIME; under a millisecond counts as 0: the two clocks are read apart)."""
    suspended = _suspend_offset() - _OFFSET_AT_START
    return suspended if suspended >= 0.001 else 0.0


class Session:
    def __init__(self, lease_id: int, clock: LeaseClock, renew: Renew, *,
                 suspended: Callable[[], float] = suspended_time) -> None:
        self.lease_id = lease_id
        self._suspended = suspended
        self.clock = clock
        self.lost = trio.Event()
        self.renewals = 0
        self.failed_renewals = 0
        self._renew = renew

    def now(self) -> float:
        """Lease time: Trio's clock plus the time the machine spent suspended."""
        return trio.current_time() + self._suspended()

    def valid(self) -> bool:
        """May this node rely on its lease right now?"""
        return self.clock.valid(self.now())

    async def keep_alive(self) -> None:
        """Renew until etcd says the lease is gone; then set ``lost`` and return."""
        clock = self.clock
        try:
            while not clock.lost:
                await trio.sleep_until(clock.next_renewal() - self._suspended())
                sent = clock.sending(self.now())
                ttl: int | None = None
                with trio.move_on_after(clock.attempt_timeout()):
                    try:
                        ttl = await self._renew(self.lease_id)
                    except LeaseNotFound:
                        clock.expired()
                        break
                    except EtcdException:
                        ttl = None
                if ttl is None:
                    clock.failed()
                    self.failed_renewals += 1
                else:
                    clock.renewed(sent, ttl)
                    self.renewals += 1
        finally:
            if clock.lost:
                self.lost.set()


@contextlib.asynccontextmanager
async def open_session(etcd: EtcdClient, ttl: int, *, margin: float | None = None) -> AsyncIterator[Session]:
    """Grant a lease of ``ttl`` seconds and keep it alive while the block runs; on
    exit stop renewing and revoke it (best effort, bounded), which deletes its keys."""
    sent = trio.current_time() + suspended_time()
    lease = await etcd.lease_grant(ttl)
    clock = LeaseClock(lease.ttl, sent, margin=margin)

    async def renew(lease_id: int) -> int:  # every endpoint gets its share of the attempt's time
        return await etcd.lease_keepalive(lease_id, budget=clock.attempt_timeout())

    session = Session(lease.id, clock, renew)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.keep_alive)
            try:
                yield session
            except BaseException as e:  # re-raised below as itself, not wrapped in a nursery's group
                body_error = e
            nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
    finally:
        session.clock.expired()  # from here on nothing may rely on it
        session.lost.set()
        with trio.move_on_after(min(1.0, etcd.timeout)) as scope:
            scope.shield = True
            with contextlib.suppress(EtcdException):
                await etcd.lease_revoke(lease.id)
