"""A logd node's part in the cluster: one task that keeps a session, registers the
node, follows the leader, and campaigns whenever there is none.

The server reads two things from it: :attr:`ClusterNode.view` (role, leader,
epoch, etcd health: for ``logd cluster`` and STATS) and
:meth:`ClusterNode.refusal` (None only while this node leads and may
acknowledge: checked before every acknowledgement).  A lost session (the lease
expired, say after a long pause) is replaced by a new one; etcd unreachable is
retried with a bounded backoff while the view says so.

Before anything else the node checks that etcd is the one it joined: the cluster
id it stored (None for a node that never joined: it takes, or creates, the id
in etcd and the server stores ``cluster_id``) and the highest epoch in its own
logs, which etcd's epoch may never be below.  On a mismatch ``run`` raises
ClusterMismatch: the node must not serve as part of this cluster.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import trio

from logd_trio.server.cluster.election import (
    ClusterKeys,
    ClusterMismatch,
    LeaderInfo,
    Leadership,
    Member,
    SessionLost,
    campaign,
    ensure_cluster_id,
    follow_leader,
    register,
)
from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.etcd_wire import EtcdException, EtcdUnavailable
from logd_trio.server.cluster.session import Session, open_session

__all__ = ["ClusterNode", "ClusterView"]

log = logging.getLogger("logd_trio.server.cluster")
JOIN_REPORT_EVERY = 10.0  # seconds between two log lines while etcd cannot be reached at start

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
                 on_change: Callable[[ClusterView], None] | None = None,
                 cluster_id: str | None = None, local_epoch: int = 0,
                 may_lead: Callable[[], bool] = lambda: True) -> None:
        if local_epoch < 0:
            raise ValueError(f"local epoch must be at least 0, got {local_epoch}")
        self.cluster_id = cluster_id  # as stored by the node; set once joined
        self.local_epoch = local_epoch  # the highest epoch in this node's logs (raise with note_epoch)
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
        self.may_lead = may_lead  # False: follow only (say, a node whose data is not known to be whole)

    def note_epoch(self, epoch: int) -> None:
        """This node's logs now hold ``epoch`` (etcd's epoch may never be below it)."""
        self.local_epoch = max(self.local_epoch, epoch)

    def refusal(self) -> str | None:
        """None if this node is leader and may acknowledge now, else why not."""
        leadership = self.leadership
        if leadership is None:
            leader = self.view.leader
            return f"not leader {leader.addr}" if leader is not None else "not leader: no leader elected"
        return leadership.refusal()

    def _update(self, view: ClusterView) -> None:
        leadership = self.leadership
        if leadership is not None and not leadership.gate.deposed:
            view = replace(view, role="leader", leader=leadership.info)  # never a leader of epoch 0
        else:
            view = replace(view, role="follower" if view.leader is not None else "no leader")
        if view != self.view:
            self.view = view
            if self.on_change is not None:
                self.on_change(view)

    def _etcd_state(self, error: str | None) -> None:
        self._update(replace(self.view, etcd_ok=error is None, etcd_error=error))

    async def join(self) -> str:
        """The cluster id, once etcd is known to be the one this node joined (retried
        while etcd is unreachable); ClusterMismatch if it is not."""
        backoff = 0.1
        report_at = trio.current_time()  # the first failure is logged, then one line per JOIN_REPORT_EVERY
        while True:
            try:
                stored = self.cluster_id
                got = await ensure_cluster_id(self.etcd, self.keys, stored or uuid.uuid4().hex,
                                              create=stored is None)
                break
            except EtcdUnavailable as e:
                self._etcd_state(str(e))
                if trio.current_time() >= report_at:
                    log.warning("cluster %s: node %s cannot reach etcd yet: %s", self.keys.cluster, self.me.node, e)
                    report_at = trio.current_time() + JOIN_REPORT_EVERY
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        if stored is not None and got != stored:
            raise ClusterMismatch(f"etcd holds cluster id {got!r} for {self.keys.cluster!r}, this node joined "
                                  f"{stored!r}: etcd wiped or restored, or a wrong endpoint")
        self.cluster_id = got
        return got

    async def run(self) -> None:
        """Runs until cancelled; ClusterMismatch (after saying so in the view) if etcd
        is not the one this node joined."""
        try:
            await self._run()
        except ClusterMismatch as e:
            self._end_leadership("etcd is not the one this node joined")
            self._etcd_state(str(e))
            log.error("cluster %s: node %s: %s; not running", self.keys.cluster, self.me.node, e)
            raise

    async def _run(self) -> None:
        await self.join()
        backoff = 0.1
        while True:
            try:
                async with open_session(self.etcd, self.lease_ttl, margin=self.margin) as session:
                    self.sessions += 1
                    await register(self.etcd, self.keys, session, self.me)
                    self._etcd_state(None)
                    backoff = 0.1
                    await self._run_session(session)
            except ClusterMismatch:
                raise
            except EtcdException as e:  # SessionLost included
                self._end_leadership("the session ended")
                if isinstance(e, EtcdUnavailable):
                    self._etcd_state(str(e))
                log.warning("cluster %s: node %s: %s; opening a new session", self.keys.cluster, self.me.node, e)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _end_leadership(self, reason: str) -> None:
        if self.leadership is not None:
            self.leadership.depose(reason)
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
                    while not self.may_lead():  # noqa: ASYNC110 (a predicate of the server's, polled)
                        await trio.sleep(0.1)
                    await self._lead_once(session)
            except EtcdException as e:
                error = e
            nursery.cancel_scope.cancel()
        raise error

    async def _lead_once(self, session: Session) -> None:
        leadership = await campaign(self.etcd, self.keys, session, self.me, recheck=self.lease_ttl,
                                    idle_timeout=self.idle_timeout, local_epoch=lambda: self.local_epoch)
        self.leadership = leadership
        self.note_epoch(leadership.epoch)
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

    def _on_leader(self, leader: LeaderInfo | None, revision: int) -> None:
        """The leader key as seen at ``revision``.  A leader deposes itself as soon as
        the key is gone or another's, whether or not its guard's watch is live; a
        sighting older than its own leadership says nothing about it."""
        leadership = self.leadership
        if leadership is not None:
            if leader is not None:
                leadership.gate.observe_epoch(leader.epoch)
            if revision > leadership.info.create_revision and (
                    leader is None or leader.create_revision != leadership.info.create_revision):
                leadership.depose("the leader key is gone or another node's")
        self._update(replace(self.view, leader=leader, etcd_ok=True, etcd_error=None))
