"""A node's etcd session: one lease, kept alive by one task, with its deadline.

Everything the node puts in etcd that must vanish when the node does (its member
key, its leader key) is put on this lease.  The keepalive task renews every
``ttl / 3``; each attempt is bounded, and a failed one is retried every
``ttl / 10``.  The deadline bookkeeping (fencing.LeaseClock) counts from each
keepalive's send time.  When etcd says the lease is gone, ``lost`` is set and the
session is over: the node must open a new one (and is no longer leader).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.etcd_wire import EtcdException, LeaseNotFound
from logd_trio.server.cluster.fencing import LeaseClock

__all__ = ["Renew", "Session", "open_session"]

Renew = Callable[[int], Awaitable[int]]  # lease id -> granted TTL; raises LeaseNotFound


class Session:
    def __init__(self, lease_id: int, clock: LeaseClock, renew: Renew) -> None:
        self.lease_id = lease_id
        self.clock = clock
        self.lost = trio.Event()
        self.renewals = 0
        self.failed_renewals = 0
        self._renew = renew

    def valid(self) -> bool:
        """May this node rely on its lease right now?"""
        return self.clock.valid(trio.current_time())

    async def keep_alive(self) -> None:
        """Renew until etcd says the lease is gone; then set ``lost`` and return."""
        clock = self.clock
        try:
            while not clock.lost:
                await trio.sleep_until(clock.next_renewal())
                sent = clock.sending(trio.current_time())
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
    sent = trio.current_time()
    lease = await etcd.lease_grant(ttl)
    session = Session(lease.id, LeaseClock(lease.ttl, sent, margin=margin), etcd.lease_keepalive)
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
