"""A node's replication state: its role, the leader epoch, the topics' epoch files, the followers' progress.

One per server, owned by the :class:`~logd_trio.server.registry.Registry`.
A leader (no ``replicate_from``) starts a new epoch at every start: the
counter in ``<workdir>/leader-epoch`` is incremented and fsynced before any
topic opens, and each topic's epoch file gets ``<epoch> <head>`` before its
first batch of that epoch.  A follower keeps the leader's epochs in its own
files (written by the fetcher) and refuses BATCH and FETCH with
``ERR not leader HOST:PORT``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from logd_trio.core.errors import LogdError, RequestError
from logd_trio.core.fetch import Fetch
from logd_trio.server.config import ServerConfig
from logd_trio.server.replica.follower_log import FollowerLog, FollowerTopic
from logd_trio.server.replica.marks import (
    EPOCH_COUNTER,
    Watermarks,
    new_history,
    read_counter,
    read_history,
    write_counter,
    write_history,
)
from logd_trio.server.replica.report import FollowerProgress, Reporting
from logd_trio.server.stats import Counters
from logd_trio.server.storage.epochs import EpochFile
from logd_trio.server.topic import Topic

__all__ = ["EPOCH_COUNTER", "FollowerProgress", "ReplicaState", "ReplicationRefused", "write_counter"]

log = logging.getLogger("logd_trio.server.replica")


class ReplicationRefused(LogdError):
    """This node cannot replicate as configured (pointed at itself, at a follower, ...); the server stops."""


class ReplicaState(Reporting):
    """See the module docstring."""

    def __init__(self, config: ServerConfig, counters: Counters | None = None) -> None:
        self.config = config
        self.counters = counters if counters is not None else Counters()
        self.counters.replica_gauges = self.gauges
        self.marks = Watermarks(Path(config.workdir), config.file_mode)  # high watermarks, checkpointed
        self.history = ""  # the data directory's history id (marks.py); a follower keeps its leader's
        self.halted: str | None = None  # a follower that refuses its leader's history: why (CLUSTER, STATS)
        self.leader_heads: dict[str, int] = {}  # a follower: each topic's head at the leader, as last told
        self.acks_waiting = 0  # BATCH replies waiting for the followers now
        self.node_id = config.node_id
        self.leader = config.replicate_from  # "" on the leader
        self.epoch = 0  # the leader epoch this node serves (a leader) or last saw (a follower)
        self.epochs: dict[str, EpochFile] = {}
        self.followers: dict[tuple[str, str], FollowerProgress] = {}
        self._progress = trio.Event()  # set (and replaced) whenever a follower's acknowledgement moves
        self.topics: dict[str, Topic] = {}  # every topic opened (for the high watermark's wake-ups)
        # With --etcd the cluster task (server/clustering.py) sets the role: the node leads (and takes local
        # writes) only while ``leading``; ``gate`` is the cluster's refusal (None: may acknowledge); ``isr_needed``
        # the followers whose copy an OK waits for, ``isr_size`` the in-sync set's size in etcd (leader included).
        self.clustered = bool(config.etcd)
        self._leading = False
        self.generation = 0  # +1 whenever ``leading`` changes: an OK waits within one leadership
        self.held_hw: dict[str, int] = {}  # a deposed leader's readers stay capped here until reconciled
        self.gate: Callable[[], str | None] = lambda: None
        self.observe_epoch: Callable[[int], None] = lambda epoch: None
        self.on_forget: Callable[[str], None] = lambda topic: None  # the cluster's bookkeeping of a deleted topic
        self.isr_needed: frozenset[str] = frozenset()
        self.isr_size = 1
        self.acked_end: dict[str, int] = {}  # a cluster leader: per topic, the end of the last batch it acknowledged
        self.describe: Callable[[], dict[str, object]] = self._describe
        self.address = ""  # where this node listens, once bound
        self.bound = trio.Event()
        self.leader_topics: set[str] | None = None  # a follower: the leader's topics, as last listed
        self.synced_topics: set[str] = set()  # ... and those it caught up with since following it

    @property
    def leading(self) -> bool:
        return self._leading

    @leading.setter
    def leading(self, value: bool) -> None:
        """Each change starts a new leadership generation and wakes the acknowledgement waiters (a batch stored
        under one leadership is never acknowledged under another).  A node that stops leading keeps its
        readers at the high watermark it had until it reconciled each topic."""
        if value == self._leading:
            return
        if not value and self.config.acks == "all":
            self.held_hw = {n: self.high_watermark(n, t.visible_head) for n, t in self.topics.items()}
        elif value:
            self.held_hw = {}
        self._leading = value
        self.generation += 1
        self.progressed()

    def reconciled(self, topic: str) -> None:
        """This node's copy of ``topic`` now matches a leader's history: its readers are no longer held."""
        if self.held_hw.pop(topic, None) is not None and (t := self.topics.get(topic)) is not None:
            t.wake_readers()

    def forget(self, topic: str) -> None:
        """``topic`` was deleted: nothing noted of it stays (made anew, it starts from nothing)."""
        for noted in (self.topics, self.epochs, self.acked_end, self.held_hw):
            noted.pop(topic, None)
        self.marks.forget(topic)
        self.on_forget(topic)

    def listening(self, address: str) -> None:
        self.address = address
        self.bound.set()

    @property
    def await_acks(self) -> bool:
        """A BATCH's OK waits (AwaitReplicas): for the followers (``--acks all``), for the cluster's check."""
        return self.config.acks == "all" or self.clustered

    @property
    def is_follower(self) -> bool:
        return bool(self.leader) and not self.clustered

    def load(self) -> None:
        """Blocking: a leader takes the next epoch (durably) before its topics open."""
        workdir = Path(self.config.workdir)
        path = workdir / EPOCH_COUNTER
        last = read_counter(path)
        self.marks.load()
        self.history = read_history(workdir)
        if self.is_follower or self.clustered:  # a cluster node's epochs come from etcd
            self.epoch = last
            return
        if not self.history:  # a new (or emptied) directory starts a history of its own
            self.history = new_history()
            write_history(workdir, self.history, self.config.file_mode)
        self.epoch = last + 1
        write_counter(path, self.epoch, self.config.file_mode)
        log.info("leader epoch %d", self.epoch)

    def open_topic(self, root: Path, name: str, now: int | None = None) -> Topic:
        """Blocking: open (recover) a topic and its epoch file; a leader records its epoch from the head.
        ``now``: the wall clock (Unix ms), read on the Trio thread.  A follower's topics are
        :class:`FollowerTopic` (appends only at the offsets the leader gave)."""
        c = self.config
        if self.is_follower or self.clustered:
            flog = FollowerLog.open(root, name, partition_size=c.partition_size, partitions=c.partitions,
                                    file_mode=c.file_mode, dir_mode=c.dir_mode, now_ms=now)
            assert isinstance(flog, FollowerLog)  # open() builds the class it is called on
            topic: Topic = FollowerTopic(name, flog, c, leading=lambda: self.leading)
        else:
            topic = Topic.open(root, name, c, now)
        try:
            ef = EpochFile.load(Path(root) / name, c.file_mode)
            ef.truncate(topic.log.head + 1)  # recovery may have cut the log below an epoch's start
            if (not self.is_follower and not self.clustered) or self.leading:
                ef.assign(self.epoch, topic.log.head)
        except BaseException:
            topic.log.close_without_sync()
            raise
        self.epochs[name] = ef
        self.topics[name] = topic
        self.marks.cut(name, topic.log.head, wake=False)  # recreated (or cut by recovery) since the checkpoint
        if c.acks == "all" or self.is_follower:  # a follower's readers stop at its leader's high watermark
            topic.read_cap = lambda: self.high_watermark(name, topic.visible_head)
        if self.clustered and c.acks == "all" and not self.leading:  # restarted: held until reconciled
            self.held_hw.setdefault(name, self.marks.get(name))
        return topic

    def note_epoch(self, epoch: int) -> None:
        """Blocking (follower): remember the newest leader epoch seen."""
        if epoch > self.epoch:
            self.epoch = epoch
            write_counter(Path(self.config.workdir) / EPOCH_COUNTER, epoch, self.config.file_mode)

    # ------------------------------------------------------------ leader side

    def refusal(self) -> str | None:
        """Why this node may not acknowledge a write now (None: it may)."""
        if self.clustered:
            why = self.gate()
            if why is None and not self.leading:
                why = f"not leader: taking over epoch {self.epoch}"
            return why
        return f"not leader {self.leader}" if self.leader else None

    def refuse_writes(self) -> None:
        """``ERR not leader HOST:PORT`` on a follower, ``ERR not enough replicas`` (--acks all, too few in sync)."""
        why = self.refusal()
        if why is not None:
            raise RequestError(why)
        if self.config.acks == "all" and (len(self.in_sync(trio.current_time())) + 1 < self.config.min_insync
                                          or (self.clustered and self.isr_size < self.config.min_insync)):
            raise RequestError("not enough replicas")

    def high_watermark(self, topic: str, visible: int) -> int:
        """What is durable on enough nodes that no failover can lose it (readers stop there).  Never
        moves back (:class:`Watermarks`) on a plain leader or follower: a restarted node starts at its
        checkpoint, a follower at what its leader told it; a leader short of followers keeps it."""
        marks = self.marks
        if self.clustered:
            if not self._leading:  # held until reconciled, then what its leader told it (never beyond)
                held = self.held_hw.get(topic)
                return min(visible, marks.get(topic) if held is None else held)
            hw = visible
            for n in self.isr_needed:
                p = self.followers.get((n, topic))
                hw = min(hw, p.offset if p is not None else 0)
            # checkpointed (a restart holds its readers there: open_topic) and never back: a joiner
            # waited for may hold less than readers were shown (it must reach it to join)
            marks.raise_to(topic, hw)
            return min(visible, marks.get(topic))
        if self.is_follower:
            return min(visible, marks.get(topic))
        need = self.config.min_insync - 1
        if need <= 0:
            return visible
        insync = self.in_sync(trio.current_time())
        got = sorted((p.offset for (n, t), p in self.followers.items() if t == topic and n in insync), reverse=True)
        marks.raise_to(topic, min(visible, got[need - 1]) if len(got) >= need else 0)
        return min(visible, marks.get(topic))

    def told(self, topic: str, hw: int) -> None:
        """A follower: the leader's high watermark of ``topic`` (its readers may move up to it)."""
        if self.marks.raise_to(topic, hw) and (t := self.topics.get(topic)) is not None:
            t.wake_readers()

    def in_sync(self, now: float) -> set[str]:
        """Followers that fetched every topic they follow, caught up, within ``--replica-lag``."""
        lag = self.config.replica_lag
        nodes: dict[str, bool] = {}
        for (node, _), p in self.followers.items():
            nodes[node] = nodes.get(node, True) and (p.polling > 0 or now - p.caught_up <= lag)
        return {n for n, ok in nodes.items() if ok}

    def record(self, node: str, topic: str, offset: int, head: int) -> None:
        """A fetch from ``node`` arrived at ``offset``: its acknowledgement.  It is caught up when it has
        everything the leader had at its previous answer (or at ``head``, the leader's durable head now)."""
        now = trio.current_time()
        p = self.followers.get((node, topic))
        if p is None:  # a topic new to this follower: an in-sync follower gets --replica-lag to catch up on it
            caught = offset >= head or node in self.in_sync(now)
            p = self.followers[(node, topic)] = FollowerProgress(offset, now, now if caught else -math.inf,
                                                                 joined=now)
        else:
            p.offset, p.at = offset, now
            if offset >= head or 0 <= p.replied_head <= offset:
                p.caught_up = now
        self.progressed()
        t = self.topics.get(topic)
        if t is not None and t.read_cap is not None:
            self.high_watermark(topic, t.visible_head)  # moves the mark (checkpointed) with no reader asking
            t.wake_readers()

    def progressed(self) -> None:
        """Acknowledgement waiters look again (a follower moved, or the in-sync set changed)."""
        self._progress.set()
        self._progress = trio.Event()

    @contextlib.contextmanager
    def polling(self, node: str, topic: str) -> Iterator[None]:
        """While ``node`` long-polls ``topic`` at the leader's head it has all there is: it stays
        caught up however long the wait (an idle topic must not push it out of the in-sync set)."""
        p = self.followers.get((node, topic))
        if p is None:
            yield
            return
        p.polling += 1
        try:
            yield
        finally:
            p.polling -= 1
            p.caught_up = max(p.caught_up, trio.current_time())  # it was caught up until now

    def check_generation(self, generation: int) -> None:
        """A cluster node: raise ``ERR not leader`` unless it leads in the leadership ``generation``."""
        if self.clustered and (not self._leading or self.generation != generation):
            why = self.refusal()
            raise RequestError(why if why is not None and why.startswith("not leader") else "not leader")

    async def wait_acks(self, topic: str, end: int, generation: int = 0) -> None:
        """``--acks all``: return once the batch ending at ``end`` is durable on ``--min-insync`` nodes (the
        leader's own copy is, when this is called).  Raises ``RequestError("not enough replicas")``
        when the in-sync set shrinks below that meanwhile; a cluster leader raises ``ERR not leader``
        at once when its leadership ``generation`` (the one the batch was stored in) ends."""
        self.acks_waiting += 1
        try:
            if self.clustered:
                return await self._wait_isr(topic, end, generation)
            return await self._wait_insync(topic, end)
        finally:
            self.acks_waiting -= 1

    async def _wait_insync(self, topic: str, end: int) -> None:
        need = self.config.min_insync - 1
        # at most --replica-lag and one re-check (e.g. a topic no follower fetches: nobody leaves the set)
        deadline = trio.current_time() + self.config.replica_lag * 1.25
        while need > 0:
            if trio.current_time() >= deadline:
                raise RequestError("not enough replicas")
            insync = self.in_sync(trio.current_time())
            if len(insync) < need:
                raise RequestError("not enough replicas")
            acked = sum(1 for n in insync if (p := self.followers.get((n, topic))) is not None and p.offset >= end)
            if acked >= need:
                return
            with trio.move_on_after(min(self.config.replica_lag / 4, max(deadline - trio.current_time(), 0))):
                await self._progress.wait()

    async def _wait_isr(self, topic: str, end: int, generation: int) -> None:
        """A cluster leader: every other member of the in-sync set (as in etcd, and any set being
        written) must hold the batch: any of them may be the next leader."""
        deadline = trio.current_time() + self.config.replica_lag * 1.5  # a laggard leaves the set before
        while True:
            self.check_generation(generation)  # deposed (woken by the change), or leading again: never OK
            why = self.refusal()  # the lease unconfirmed meanwhile: say so now, not at the deadline
            if why is not None:
                raise RequestError(why)
            if self.isr_size < self.config.min_insync or trio.current_time() >= deadline:
                raise RequestError(self.refusal() or "not enough replicas")  # e.g. woken past its lease: not leader
            if all((p := self.followers.get((n, topic))) is not None and p.offset >= end for n in self.isr_needed):
                self.acked_end[topic] = max(self.acked_end.get(topic, 0), end)  # a joiner must hold it
                return
            with trio.move_on_after(min(self.config.replica_lag / 4, max(deadline - trio.current_time(), 0))):
                await self._progress.wait()

    def answered(self, node: str, topic: str, visible: int, hw: int) -> None:
        """The leader answered ``node`` on ``topic`` with its head at ``visible`` and its high watermark."""
        progress = self.followers.get((node, topic))
        if progress is not None:
            progress.replied_head, progress.told_hw = visible, hw

    def leader_hw(self, topic: str, visible: int, node: str = "", end: int = -1) -> int:
        """The high watermark a FETCH reply tells (the head when readers are not capped).  A reply
        to ``node`` carrying frames up to ``end`` tells what the high watermark will be once that
        in-sync follower holds them (true when its readers can see them: after it stored them),
        so that its readers need no second round trip."""
        t = self.topics.get(topic)
        if t is None or t.read_cap is None:
            return visible
        hw = self.high_watermark(topic, visible)
        need = self.config.min_insync - 1
        if end <= hw or not node or self.clustered or self.leader or need <= 0:
            return hw
        insync = self.in_sync(trio.current_time())
        if node not in insync:
            return hw
        got = sorted((end if n == node else p.offset for (n, tp), p in self.followers.items()
                      if tp == topic and n in insync), reverse=True)
        return max(hw, min(visible, got[need - 1])) if len(got) >= need else hw

    def told_hw(self, node: str, topic: str) -> int:
        p = self.followers.get((node, topic))
        return -1 if p is None else p.told_hw

    def hw_moved(self, node: str, topic: str, visible: int) -> bool:
        """The high watermark moved past what ``node`` was last told (its long-poll answers now)."""
        p = self.followers.get((node, topic))
        return p is not None and self.leader_hw(topic, visible) > p.told_hw

    def check_fetch(self, req: Fetch) -> None:
        """The request-level checks of a FETCH (before any wait).  Raises :class:`RequestError`."""
        if self.clustered:
            if req.epoch > self.epoch:
                self.observe_epoch(req.epoch)  # a follower knows a newer leader: this one is deposed
            why = self.refusal() if not self.leading else None
            if why is not None:
                raise RequestError(why)
        elif self.leader:
            raise RequestError(f"not leader {self.leader}")
        if self.node_id and req.node == self.node_id:
            raise RequestError(f"fetch from node id {req.node}, which is this node's own id")
        if (req.epoch or self.clustered) and req.epoch != self.epoch:  # a cluster's fetch must name the epoch
            raise RequestError(f"fenced: epoch {req.epoch}, the leader's is {self.epoch}")
