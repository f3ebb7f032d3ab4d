"""A cluster node (``logd serve --etcd URL[,URL...] --cluster NAME``): the etcd layer (cluster/) driving
the data plane (replica/).

One task, started once the server listens, owns:

- the :class:`~logd_trio.server.cluster.node.ClusterNode` (session, registration, election);
- the role: when this node wins an epoch it stops copying, records the epoch in every topic's
  epoch file (before any batch of it) and only then takes writes; when another node leads it
  copies that node (``replica/fetcher.py``), first cutting what its logs hold beyond the new
  leader's history (copied aside);
- the in-sync set in etcd while leading: a follower joins once it holds everything acknowledged
  (two fixed targets, cluster/joining.py: it is waited for before it joins), and leaves when it
  lagged ``--replica-lag``; every change is written (fenced) before the acknowledgements stop
  waiting for a leaver; the waiters are woken the moment the lease lapses;
- eligibility: a node that never stored this cluster's id (a new node, or a wiped data directory)
  may not lead a cluster that already had a leader until it has caught up with one;
- what ``CLUSTER`` answers (``describe``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import trio

from logd_trio.server.blocking import run_blocking
from logd_trio.server.cluster.election import ClusterKeys, Leadership, Member, list_members
from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.etcd_wire import EtcdException, EtcdIndeterminate
from logd_trio.server.cluster.joining import Joins
from logd_trio.server.cluster.keys import InSync, epoch_of
from logd_trio.server.cluster.node import ClusterNode, ClusterView
from logd_trio.server.cluster.tls import etcd_context
from logd_trio.server.registry import Registry
from logd_trio.server.replica.fetcher import Target, follow
from logd_trio.server.replica.state import EPOCH_COUNTER, FollowerProgress, write_counter
from logd_trio.server.storage.files import O_CLOEXEC, fsync_dir
from logd_trio.server.storage.syscalls import current

__all__ = ["CLUSTER_ID", "Clustering"]

log = logging.getLogger("logd_trio.server.clustering")

CLUSTER_ID = "cluster-id"  # in the data directory: the cluster this node's data belongs to
ISR_PERIOD = 0.1  # seconds between looks at the followers' progress (leader)
MEMBERS_PERIOD = 1.0  # seconds between reads of the members and the in-sync set (for CLUSTER)


def _read_id(path: Path) -> str | None:
    try:
        text = path.read_text("ascii").strip()
    except FileNotFoundError:
        return None
    return text or None


def _write_id(path: Path, value: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, mode)
    try:
        os.write(fd, value.encode("ascii") + b"\n")
        current().fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Clustering:
    """See the module docstring.  ``run`` until cancelled (ClusterMismatch ends it: the server stops)."""

    def __init__(self, registry: Registry) -> None:
        c = registry.config
        self.registry = registry
        self.state = registry.replica
        self.config = c
        self.keys = ClusterKeys(c.cluster)
        self.etcd = EtcdClient([u.strip() for u in c.etcd.split(",")], timeout=min(2.0, c.lease_ttl),
                               ssl_context=etcd_context(c))
        self.node: ClusterNode | None = None
        self.changed = trio.Event()
        self.eligible = False
        self.members: dict[str, str] = {}
        self.members_at = -1.0  # when ``members`` was last read from etcd
        self.isr_seen: tuple[str, ...] = ()  # the in-sync set as last read (a follower's view)
        self.pending: frozenset[str] = frozenset()  # a set being written: waited for until confirmed
        self.lead_start = 0.0
        self.first_seen: dict[str, float] = {}
        self.takeover_heads: dict[str, int] = {}  # each topic's head when this node took over (leader)
        self.joins = Joins()  # the join floors and joiners of the leadership (leader)
        self.following: Target | None = None
        self.led: Leadership | None = None  # the leadership this node last took writes with
        self._follow_scope: trio.CancelScope | None = None
        self._follow_done: trio.Event | None = None
        s = self.state
        s.gate = self._gate
        s.observe_epoch = self._observe_epoch
        s.on_forget = self._forget_topic
        s.describe = self.describe

    # ------------------------------------------------------------ hooks the data plane calls

    def _gate(self) -> str | None:
        node = self.node
        return "not leader: not in the cluster yet" if node is None else node.refusal()

    def _observe_epoch(self, epoch: int) -> None:
        node = self.node
        leadership = node.leadership if node is not None else None
        if leadership is not None and epoch > leadership.epoch:
            leadership.depose(f"a follower knows epoch {epoch}, newer than this leader's {leadership.epoch}")

    def _on_change(self, view: ClusterView) -> None:
        node = self.node
        leadership = node.leadership if node is not None else None
        if self.state.leading and (leadership is None or leadership.gate.deposed
                                   or leadership.epoch != self.state.epoch):
            self.state.leading = False  # at once: no local write lands after this
            self.state.progressed()  # OKs being waited for are refused now
            log.warning("node %s: no longer leads epoch %d", self.config.node_id, self.state.epoch)
        self.changed.set()

    # ------------------------------------------------------------ the task

    async def run(self) -> None:
        await self.state.bound.wait()
        c, state = self.config, self.state
        addr = c.advertise or state.address
        root = Path(c.workdir)
        stored = await run_blocking(_read_id, root / CLUSTER_ID)
        local_epoch = max([state.epoch, *(ef.latest for ef in state.epochs.values())])
        self.node = node = ClusterNode(self.etcd, self.keys, Member(c.node_id, addr), lease_ttl=int(c.lease_ttl),
                                       on_change=self._on_change, cluster_id=stored, local_epoch=local_epoch,
                                       may_lead=lambda: self.eligible,
                                       idle_timeout=max(2.0, 2 * c.lease_ttl))
        log.info("node %s: cluster %s through etcd %s, advertising %s", c.node_id, c.cluster, c.etcd, addr)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.run)
                nursery.start_soon(self._eligibility, stored)
                nursery.start_soon(self._roles, nursery)
                nursery.start_soon(self._isr_loop)
                nursery.start_soon(self._members_loop)
                nursery.start_soon(self._lapse_loop)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                led = self.led  # still ours when only this stop ended it: hand over now, not after the lease
                if led is not None and led.gate.deposed_by in (None, "stopped"):
                    self.state.leading = False
                    with contextlib.suppress(EtcdException):
                        await led.resign()
                        log.info("node %s: resigned epoch %d", c.node_id, led.epoch)
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self.etcd.aclose()

    async def _eligibility(self, stored: str | None) -> None:
        node = self.node
        assert node is not None
        root = Path(self.config.workdir)
        if stored is not None:
            self.eligible = True
            return
        while node.cluster_id is None:  # noqa: ASYNC110 (set by the node's join: nothing to wait on)
            await trio.sleep(0.05)
        while True:
            try:
                epoch = epoch_of(await self.etcd.get(self.keys.epoch))
                break
            except EtcdException:
                await trio.sleep(0.2)
        state = self.state
        if epoch > 0 or any(t.visible_head > t.first for t in state.topics.values()):
            log.warning("node %s: no record of cluster %s in %s while the cluster (epoch %d) or this directory "
                        "holds data: it may not lead until it has caught up with a leader", self.config.node_id,
                        self.config.cluster, root, epoch)
            while not (state.leader_topics is not None and state.leader_topics <= state.synced_topics  # noqa: ASYNC110
                       and not state.leading):
                await trio.sleep(0.1)
        await run_blocking(_write_id, root / CLUSTER_ID, node.cluster_id, self.config.file_mode)
        self.eligible = True
        log.info("node %s: joined cluster %s (id %s)", self.config.node_id, self.config.cluster, node.cluster_id)

    async def _roles(self, nursery: trio.Nursery) -> None:
        node = self.node
        assert node is not None
        me = self.config.node_id
        while True:
            self.changed = trio.Event()
            leadership = node.leadership
            view = node.view
            if leadership is not None and not leadership.gate.deposed:
                if not (self.state.leading and self.state.epoch == leadership.epoch):
                    await self._stop_following()
                    await self._activate(leadership)
                    continue
            elif view.leader is not None and view.leader.node != me:
                host, _, port = view.leader.addr.rpartition(":")
                target = Target(host.strip("[]"), int(port), f"{view.leader.node} ({view.leader.addr})",
                                clustered=True, epoch=view.leader.epoch)
                if target != self.following:
                    await self._stop_following()
                    await nursery.start(self._follow, target)
            await self.changed.wait()

    async def _follow(self, target: Target, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        done = trio.Event()
        with trio.CancelScope() as scope:
            self._follow_scope, self._follow_done, self.following = scope, done, target
            log.info("node %s: following %s, epoch %d", self.config.node_id, target.label, target.epoch)
            task_status.started()
            try:
                await follow(self.registry, target)
            finally:
                done.set()

    async def _stop_following(self) -> None:
        if self._follow_scope is not None and self._follow_done is not None:
            self._follow_scope.cancel()
            await self._follow_done.wait()  # the reply being stored lands first (shielded)
        self._follow_scope = self._follow_done = None
        self.following = None

    async def _activate(self, leadership: Leadership) -> None:
        """Record the epoch in every topic (durably, before its first batch), then take writes."""
        state, epoch = self.state, leadership.epoch
        topics = [(state.epochs[name], topic) for name, topic in state.topics.items()]
        counter = Path(self.config.workdir) / EPOCH_COUNTER

        def assign() -> None:
            for ef, topic in topics:
                ef.assign(epoch, topic.log.head)
            write_counter(counter, epoch, self.config.file_mode)

        await run_blocking(assign)
        if leadership.gate.deposed:
            return
        self.takeover_heads = {name: topic.log.head for name, topic in state.topics.items()}
        state.epoch, state.leader = epoch, ""
        state.followers.clear()
        self.pending = frozenset()
        self.joins = Joins(self.takeover_heads)
        state.acked_end = {}  # this leadership's own (the takeover heads cover the earlier)
        self.lead_start = trio.current_time()
        self.first_seen = {}
        self._publish_isr(leadership)
        self.led = leadership
        state.leading = True
        await self._read_members()
        log.info("node %s: leads epoch %d, in sync: %s", self.config.node_id, epoch, ", ".join(leadership.in_sync))

    def _forget_topic(self, topic: str) -> None:
        """A deleted topic: its join floor and takeover head go (made anew, it starts at 0)."""
        self.takeover_heads.pop(topic, None)
        self.first_seen.pop(topic, None)
        self.joins.drop(topic)

    async def _lapse_loop(self) -> None:
        """While leading, wake the acknowledgement waiters the moment the lease lapses (no renewal
        confirmed in time): they answer ``ERR not leader`` then, not at their next look."""
        woken: Leadership | None = None
        while True:
            node = self.node
            leadership = node.leadership if node is not None else None
            if leadership is None or not self.state.leading or leadership.gate.deposed:
                await trio.sleep(ISR_PERIOD)
                continue
            left = leadership.gate.clock.remaining(leadership.session.now())
            if left > 0:
                woken = None
                await trio.sleep(left)  # a renewal meanwhile moves the deadline: looked at again then
                continue
            if woken is not leadership:
                woken = leadership
                log.warning("node %s: lease of epoch %d not confirmed in time: acknowledging nothing",
                            self.config.node_id, leadership.epoch)
                self.state.progressed()
            await trio.sleep(ISR_PERIOD)

    # ------------------------------------------------------------ the in-sync set (leader)

    def _publish_isr(self, leadership: Leadership) -> None:
        confirmed = set(leadership.in_sync)
        union = confirmed | self.pending | set(leadership.in_sync_unsure or ()) | set(self.joins.waited)
        self.state.isr_needed = frozenset(union - {self.config.node_id})
        self.state.isr_size = len(confirmed)
        self.state.progressed()

    def _desired(self, current: tuple[str, ...], now: float) -> tuple[str, ...]:
        state, lag, me, joins = self.state, self.config.replica_lag, self.config.node_id, self.joins
        for name in state.topics:
            self.first_seen.setdefault(name, now)
        nodes = {n for n, _ in state.followers} | set(current) | set(joins.waited)
        floors: dict[str, int] | None = None
        out = {me}
        for n in sorted(nodes - {me}):
            progress = [(t, state.followers.get((n, t))) for t in state.topics]
            if n in current:  # stays unless its session is gone, or it lagged --replica-lag on some topic
                joins.forget(n)
                if self._gone(n, progress):
                    continue
                stale = any((now - p.caught_up > lag) if p is not None else (now - self.first_seen[t] > lag)
                            for t, p in progress)
                if not stale or now - self.lead_start <= lag:
                    out.add(n)
            elif n not in self.members:
                joins.forget(n)
            else:  # a registered member joins once it holds everything acknowledged (joining.py)
                if floors is None:
                    floors = {t: joins.floor(t, state.acked_end.get(t, 0), state.high_watermark(t, topic.visible_head))
                              for t, topic in state.topics.items()}
                if joins.admit(n, {t: p.offset if p is not None else None for t, p in progress}, floors, now, lag):
                    out.add(n)
        return tuple(sorted(out))

    def _gone(self, node: str, progress: list[tuple[str, FollowerProgress | None]]) -> bool:
        """A member of the set whose member key is not in etcd (read since this leadership began) and
        that has not fetched since that read: its session is gone (a live follower whose key was not
        seen yet, say just re-registered, fetches, and stays)."""
        if not (self.members_at > self.lead_start and node not in self.members):
            return False
        return not any(p is not None and (p.polling > 0 or p.at >= self.members_at) for _, p in progress)

    async def _isr_loop(self) -> None:
        while True:
            await trio.sleep(ISR_PERIOD)
            node = self.node
            leadership = node.leadership if node is not None else None
            if leadership is None or not self.state.leading or leadership.epoch != self.state.epoch:
                continue
            want = self._desired(leadership.in_sync, trio.current_time())
            if self.joins.changed:  # a joiner is waited for (or no longer) from now on
                self.joins.changed = False
                self._publish_isr(leadership)
            if set(want) == set(leadership.in_sync) and not leadership.in_sync_unsure:
                if self.pending:
                    self.pending = frozenset()
                    self._publish_isr(leadership)
                continue
            self.pending = frozenset(want)
            self._publish_isr(leadership)  # a joiner is waited for from now on
            try:
                with trio.fail_after(self.etcd.timeout + 0.5):
                    await leadership.set_in_sync(want)
                self.pending = frozenset()
                log.info("node %s: in-sync set now %s", self.config.node_id, ", ".join(leadership.in_sync))
            except (EtcdIndeterminate, EtcdException, trio.TooSlowError) as e:
                log.warning("node %s: in-sync set %s not confirmed: %s", self.config.node_id, want, e)
            self._publish_isr(leadership)

    async def _read_members(self) -> None:
        try:
            with trio.fail_after(self.etcd.timeout + 0.5):
                started = trio.current_time()
                self.members = {n: m.addr for n, m in (await list_members(self.etcd, self.keys)).items()}
                self.members_at = started
                kv = await self.etcd.get(self.keys.isr)
                self.isr_seen = InSync.from_kv(kv).members if kv is not None else ()
        except (EtcdException, trio.TooSlowError):
            pass

    async def _members_loop(self) -> None:
        while True:
            await self._read_members()
            await trio.sleep(MEMBERS_PERIOD / 4 if self.state.leading else MEMBERS_PERIOD)

    # ------------------------------------------------------------ CLUSTER

    def describe(self) -> dict[str, object]:
        node, state = self.node, self.state
        view = node.view if node is not None else None
        leader = view.leader if view is not None else None
        now = trio.current_time()
        role: str = "leader" if state.leading else (view.role if view is not None else "starting")
        if role == "leader" and not state.leading:
            role = "taking over"
        leadership = node.leadership if node is not None else None
        in_sync = list(leadership.in_sync) if state.leading and leadership is not None else list(self.isr_seen)
        followers: dict[str, dict[str, object]] = {}
        for (n, t), p in state.followers.items():
            topic = state.topics.get(t)
            head = topic.visible_head if topic is not None else p.offset
            followers.setdefault(n, {})[t] = {"offset": p.offset, "lag_bytes": max(0, head - p.offset),
                                              "caught_up_ago": round(now - p.caught_up, 3)
                                              if p.caught_up > -1e300 else None}
        return {
            "node": self.config.node_id, "cluster": self.config.cluster, "addr": self.config.advertise or state.address,
            "role": role, "epoch": state.epoch if state.leading else (leader.epoch if leader is not None else 0),
            "leader": {"node": leader.node, "addr": leader.addr, "epoch": leader.epoch} if leader is not None else None,
            "refusal": state.refusal(), "eligible": self.eligible,
            "etcd": {"ok": view.etcd_ok if view is not None else False,
                     "error": view.etcd_error if view is not None else "not started",
                     "endpoints": self.etcd.endpoints},
            "members": self.members, "in_sync": in_sync, "followers": followers,
            "topics": {n: {"first": t.first, "head": t.visible_head, "hw": t.readable_head}
                       for n, t in state.topics.items()},
        }
