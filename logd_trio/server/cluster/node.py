"""A logd node's part in the cluster: one task that keeps a session, registers the
node, follows the leader, and campaigns whenever there is none.

The server reads two things from it: :attr:`ClusterNode.view` (role, leader,
epoch, etcd health: for ``logd cluster`` and STATS) and
:meth:`ClusterNode.refusal` (None only while this node leads and may
acknowledge: checked before every acknowledgement).  A lost session (the lease
expired, say after a long pause) is replaced by a new one; etcd unreachable is
retried with a bounded backoff while the view says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import trio

from logd_trio.server.cluster.election import (
    ClusterKeys,
    LeaderInfo,
    Leadership,
    Member,
    SessionLost,
    campaign,
    follow_leader,
    register,
)
from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.etcd_wire import EtcdException, EtcdUnavailable
from logd_trio.server.cluster.session import Session, open_session

__all__ = ["ClusterNode", "ClusterView"]

log = logging.getLogger("logd_trio.server.cluster")

Role = Literal["starting", "leader", "follower", "no leader"]


@dataclass(frozen=True, slots=True)
class ClusterView:
    role: Role
    leader: LeaderInfo | None  # as last seen in etcd
    etcd_ok: bool
    etcd_error: str | None = None

    @property
    def epoch(self) -> int:
        return self.leader.epoch if self.leader is not None else 0


class ClusterNode:
    def __init__(self, etcd: EtcdClient, keys: ClusterKeys, me: Member, *, lease_ttl: int = 2,
                 margin: float | None = None, idle_timeout: float = 5.0,
                 on_change: Callable[[ClusterView], None] | None = None) -> None:
        self.etcd = etcd
        self.keys = keys
        self.me = me
        self.lease_ttl = lease_ttl
        self.margin = margin
        self.idle_timeout = idle_timeout
        self.on_change = on_change
        self.view = ClusterView("starting", None, etcd_ok=False)
        self.leadership: Leadership | None = None
        self.sessions = 0  # how many sessions this node opened (a new one after each loss)

    def refusal(self) -> str | None:
        """None if this node is leader and may acknowledge now, else why not."""
        leadership = self.leadership
        if leadership is None:
            leader = self.view.leader
            return f"not leader {leader.addr}" if leader is not None else "not leader: no leader elected"
        return leadership.refusal()

    def _update(self, view: ClusterView) -> None:
        leading = self.leadership is not None and not self.leadership.gate.deposed
        role: Role = "leader" if leading else "follower" if view.leader is not None else "no leader"
        view = replace(view, role=role)
        if view != self.view:
            self.view = view
            if self.on_change is not None:
                self.on_change(view)

    def _etcd_state(self, error: str | None) -> None:
        self._update(replace(self.view, etcd_ok=error is None, etcd_error=error))

    async def run(self) -> None:
        """Runs until cancelled."""
        backoff = 0.1
        while True:
            try:
                async with open_session(self.etcd, self.lease_ttl, margin=self.margin) as session:
                    self.sessions += 1
                    await register(self.etcd, self.keys, session, self.me)
                    self._etcd_state(None)
                    backoff = 0.1
                    await self._run_session(session)
            except EtcdException as e:  # SessionLost included
                self._end_leadership("the session ended")
                if isinstance(e, EtcdUnavailable):
                    self._etcd_state(str(e))
                log.warning("cluster %s: node %s: %s; opening a new session", self.keys.cluster, self.me.node, e)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _end_leadership(self, reason: str) -> None:
        if self.leadership is not None:
            self.leadership.gate.depose(reason)
            self.leadership = None
        self._update(self.view)

    async def _run_session(self, session: Session) -> None:
        """Follow and campaign until the session is lost; raises SessionLost then
        (or the etcd error that ended the campaign), never a nursery's group."""
        error: EtcdException = SessionLost("the session's lease is gone")
        async with trio.open_nursery() as nursery:

            async def end_with_session() -> None:
                await session.lost.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(end_with_session)
            nursery.start_soon(self._follow)
            try:
                while not session.lost.is_set():
                    await self._lead_once(session)
            except EtcdException as e:
                error = e
            nursery.cancel_scope.cancel()
        raise error

    async def _lead_once(self, session: Session) -> None:
        leadership = await campaign(self.etcd, self.keys, session, self.me, recheck=self.lease_ttl,
                                    idle_timeout=self.idle_timeout)
        self.leadership = leadership
        self._update(replace(self.view, leader=leadership.info))
        log.info("cluster %s: node %s leads epoch %d", self.keys.cluster, self.me.node, leadership.epoch)
        try:
            await leadership.guard(idle_timeout=self.idle_timeout)
        finally:
            log.warning("cluster %s: node %s no longer leads epoch %d: %s", self.keys.cluster, self.me.node,
                        leadership.epoch, leadership.gate.deposed_by or "stopped")
            self._end_leadership("stopped")

    async def _follow(self) -> None:
        """Keep ``view.leader`` current; etcd trouble shows in the view and is retried."""
        while True:
            try:
                await follow_leader(self.etcd, self.keys, self._on_leader, idle_timeout=self.idle_timeout)
            except EtcdException as e:
                self._etcd_state(str(e))
                await trio.sleep(0.2)

    def _on_leader(self, leader: LeaderInfo | None) -> None:
        if self.leadership is not None and leader is not None:
            self.leadership.gate.observe_epoch(leader.epoch)
        self._update(replace(self.view, leader=leader, etcd_ok=True, etcd_error=None))
