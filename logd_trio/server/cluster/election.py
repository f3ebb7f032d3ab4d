"""Membership and leader election of logd nodes in etcd.

Keys under ``/logd/<cluster>/``:

- ``cluster_id``: created once; a node remembers it and refuses another one.
- ``members/<node>``: ``{"node", "addr"}``, on the node's session lease.
- ``leader``: ``{"node", "addr", "epoch"}``, on the leader's session lease.
- ``epoch``: the last epoch handed out (decimal); never deleted.
- ``isr``: ``{"epoch", "members"}``, the in-sync set; only its members may take over.

A takeover is one txn: the leader key does not exist, the epoch and the in-sync
set are what the candidate read; then it puts the leader key (on its lease), the
epoch + 1 and the in-sync set stamped with the new epoch.  So epochs are dense and
strictly increasing, two leaders can never hold one epoch, and only an in-sync
node can win.  A node's epoch is its fencing token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import trio

from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.etcd_wire import (
    Compare,
    Delete,
    EtcdBadReply,
    EtcdException,
    EtcdIndeterminate,
    EtcdUnavailable,
    Get,
    KeyValue,
    LeaseNotFound,
    Put,
    RangeResult,
)
from logd_trio.server.cluster.fencing import LeaderGate
from logd_trio.server.cluster.session import Session

__all__ = [
    "ClusterDataError", "ClusterKeys", "InSync", "LeaderInfo", "Leadership", "Member", "SessionLost",
    "campaign", "campaign_once", "current_leader", "ensure_cluster_id", "follow_leader", "list_members",
    "register",
]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ClusterDataError(EtcdException):
    """A key of the cluster holds something this version cannot read."""


class SessionLost(EtcdException):
    """The session's lease is gone: open a new session."""


def check_name(kind: str, name: str) -> str:
    if not NAME.fullmatch(name):
        raise ValueError(f"bad {kind} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with "
                         f"a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class ClusterKeys:
    cluster: str

    def __post_init__(self) -> None:
        check_name("cluster name", self.cluster)

    @property
    def prefix(self) -> str:
        return f"/logd/{self.cluster}/"

    @property
    def members(self) -> str:
        return self.prefix + "members/"

    def member(self, node: str) -> str:
        return self.members + check_name("node id", node)

    @property
    def leader(self) -> str:
        return self.prefix + "leader"

    @property
    def epoch(self) -> str:
        return self.prefix + "epoch"

    @property
    def isr(self) -> str:
        return self.prefix + "isr"

    @property
    def cluster_id(self) -> str:
        return self.prefix + "cluster_id"


@dataclass(frozen=True, slots=True)
class Member:
    node: str
    addr: str

    def __post_init__(self) -> None:
        check_name("node id", self.node)

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "addr": self.addr})


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    node: str
    addr: str
    epoch: int
    lease: int
    create_revision: int  # identifies this leadership: a new leader key has a new one

    @classmethod
    def from_kv(cls, kv: KeyValue) -> LeaderInfo:
        d = _json_obj(kv)
        node, addr, epoch = d.get("node"), d.get("addr"), d.get("epoch")
        if not (isinstance(node, str) and isinstance(addr, str) and isinstance(epoch, int) and epoch > 0):
            raise ClusterDataError(f"{kv.key.decode(errors='replace')}: expected node, addr and epoch")
        return cls(node, addr, epoch, kv.lease, kv.create_revision)


@dataclass(frozen=True, slots=True)
class InSync:
    epoch: int
    members: tuple[str, ...]

    @classmethod
    def from_kv(cls, kv: KeyValue) -> InSync:
        d = _json_obj(kv)
        epoch, members = d.get("epoch"), d.get("members")
        if not (isinstance(epoch, int) and isinstance(members, list) and all(isinstance(m, str) for m in members)):
            raise ClusterDataError(f"{kv.key.decode(errors='replace')}: expected epoch and members")
        return cls(epoch, tuple(members))

    def to_json(self) -> str:
        return json.dumps({"epoch": self.epoch, "members": list(self.members)})


def _json_obj(kv: KeyValue) -> dict[str, object]:
    try:
        d = json.loads(kv.value)
    except ValueError:
        d = None
    if not isinstance(d, dict):
        raise ClusterDataError(f"{kv.key.decode(errors='replace')}: not a JSON object: {kv.value[:60]!r}")
    return d


def _epoch_of(kv: KeyValue | None) -> int:
    if kv is None:
        return 0
    try:
        return int(kv.value)
    except ValueError:
        raise ClusterDataError(f"{kv.key.decode(errors='replace')}: not an epoch: {kv.value[:30]!r}") from None


# ---------------------------------------------------------------- membership

async def ensure_cluster_id(etcd: EtcdClient, keys: ClusterKeys, proposed: str) -> str:
    """The cluster's id: ``proposed`` if this call created it, else the one already there."""
    for _ in range(3):
        try:
            r = await etcd.txn([Compare.create_revision(keys.cluster_id, 0)], [Put(keys.cluster_id, proposed)],
                               [Get(keys.cluster_id)])
        except EtcdIndeterminate:
            continue  # read it back on the next round
        if r.succeeded:
            return proposed
        got = r.responses[0]
        if isinstance(got, RangeResult) and got.kvs:
            return got.kvs[0].value.decode(errors="replace")
    kv = await etcd.get(keys.cluster_id)
    if kv is None:
        raise EtcdUnavailable("cluster id: could not create it")
    return kv.value.decode(errors="replace")


async def register(etcd: EtcdClient, keys: ClusterKeys, session: Session, me: Member) -> None:
    """Put this node's member key on its session lease (it vanishes with the session)."""
    try:
        await etcd.put(keys.member(me.node), me.to_json(), lease=session.lease_id)
    except LeaseNotFound as e:
        raise SessionLost(f"lease {session.lease_id:x} is gone") from e


async def list_members(etcd: EtcdClient, keys: ClusterKeys) -> dict[str, Member]:
    out: dict[str, Member] = {}
    for kv in (await etcd.get_prefix(keys.members)).kvs:
        d = _json_obj(kv)
        node, addr = d.get("node"), d.get("addr")
        if isinstance(node, str) and isinstance(addr, str) and NAME.fullmatch(node):
            out[node] = Member(node, addr)
        else:
            raise ClusterDataError(f"{kv.key.decode(errors='replace')}: expected node and addr")
    return out


async def current_leader(etcd: EtcdClient, keys: ClusterKeys) -> tuple[LeaderInfo | None, int]:
    """The leader now (None if there is none) and the revision it was read at."""
    r = await etcd.range(keys.leader)
    return (LeaderInfo.from_kv(r.kvs[0]) if r.kvs else None), r.header.revision


async def follow_leader(etcd: EtcdClient, keys: ClusterKeys, on_change: Callable[[LeaderInfo | None], None], *,
                        idle_timeout: float = 5.0) -> None:
    """Call ``on_change`` with the leader now, then at each change (None: no leader).
    Runs until cancelled; raises EtcdUnavailable when etcd cannot be reached."""
    leader, revision = await current_leader(etcd, keys)
    on_change(leader)
    async with etcd.watch(keys.leader, start_revision=revision + 1, idle_timeout=idle_timeout) as w:
        async for event in w:
            on_change(None if event.type == "DELETE" else LeaderInfo.from_kv(event.kv))


# ---------------------------------------------------------------- leadership

class Leadership:
    """This node is leader of ``epoch`` while ``gate`` says so (see fencing.py)."""

    def __init__(self, etcd: EtcdClient, keys: ClusterKeys, session: Session, info: LeaderInfo) -> None:
        self.etcd = etcd
        self.keys = keys
        self.session = session
        self.info = info
        self.gate = LeaderGate(info.epoch, session.clock)

    @property
    def epoch(self) -> int:
        return self.info.epoch

    def refusal(self) -> str | None:
        """None if this leader may acknowledge now, else the reason (``not leader: ...``)."""
        return self.gate.refusal(trio.current_time())

    def _mine(self) -> Compare:
        return Compare.create_revision(self.keys.leader, self.info.create_revision)

    async def set_in_sync(self, members: tuple[str, ...]) -> bool:
        """Write the in-sync set, only while the leader key is still ours (fenced);
        False (and deposed) if it is not.  EtcdIndeterminate: not known, retry."""
        if self.info.node not in members:
            raise ValueError("the leader is always in its in-sync set")
        r = await self.etcd.txn([self._mine()], [Put(self.keys.isr, InSync(self.epoch, members).to_json())])
        if not r.succeeded:
            self.gate.depose("the leader key is no longer ours")
        return r.succeeded

    async def resign(self) -> None:
        """Stop acknowledging, then delete the leader key if it is still ours."""
        self.gate.depose("resigned")
        await self.etcd.txn([self._mine()], [Delete(self.keys.leader)])

    async def guard(self, *, idle_timeout: float = 5.0) -> None:
        """Watch the leader key; returns once this leadership is over (the key gone
        or replaced, the session lost), with the gate deposed."""
        async with trio.open_nursery() as nursery:

            async def on_session_lost() -> None:
                await self.session.lost.wait()
                self.gate.depose("the session's lease is gone")
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_session_lost)
            while not self.gate.deposed:
                try:
                    await self._watch_key(idle_timeout)
                except EtcdException:  # unreachable, or a watch etcd cancelled: the lease deadline keeps us safe
                    await trio.sleep(min(0.5, self.session.clock.retry))
            nursery.cancel_scope.cancel()

    async def _watch_key(self, idle_timeout: float) -> None:
        r = await self.etcd.range(self.keys.leader)
        if not r.kvs or r.kvs[0].create_revision != self.info.create_revision:
            self.gate.depose("the leader key is gone or another node's")
            return
        async with self.etcd.watch(self.keys.leader, start_revision=r.header.revision + 1,
                                   idle_timeout=idle_timeout) as w:
            async for event in w:
                if event.type == "DELETE" or event.kv.create_revision != self.info.create_revision:
                    self.gate.depose("the leader key is gone or another node's")
                    return


async def _snapshot(etcd: EtcdClient, keys: ClusterKeys) -> tuple[list[KeyValue | None], int]:
    r = await etcd.txn([], [Get(keys.leader), Get(keys.epoch), Get(keys.isr)])
    out: list[KeyValue | None] = []
    for resp in r.responses:
        if not isinstance(resp, RangeResult):
            raise EtcdBadReply("campaign: a read-only txn answered with a write")
        out.append(resp.kvs[0] if resp.kvs else None)
    return out, r.header.revision


async def _attempt(etcd: EtcdClient, keys: ClusterKeys, session: Session, me: Member) -> tuple[Leadership | None, int]:
    for _ in range(3):
        (leader_kv, epoch_kv, isr_kv), revision = await _snapshot(etcd, keys)
        if leader_kv is not None:
            info = LeaderInfo.from_kv(leader_kv)
            if info.node == me.node and info.lease == session.lease_id:  # an earlier attempt did win
                return Leadership(etcd, keys, session, info), revision
            return None, revision
        isr = InSync.from_kv(isr_kv) if isr_kv is not None else None
        if isr is not None and me.node not in isr.members:
            return None, revision  # not in sync: may not take over
        epoch = _epoch_of(epoch_kv) + 1
        value = json.dumps({"node": me.node, "addr": me.addr, "epoch": epoch})
        in_sync = InSync(epoch, isr.members if isr is not None else (me.node,))
        compare = [Compare.create_revision(keys.leader, 0),
                   Compare.mod_revision(keys.epoch, epoch_kv.mod_revision if epoch_kv else 0),
                   Compare.mod_revision(keys.isr, isr_kv.mod_revision if isr_kv else 0)]
        success = [Put(keys.leader, value, lease=session.lease_id), Put(keys.epoch, str(epoch)),
                   Put(keys.isr, in_sync.to_json())]
        try:
            r = await etcd.txn(compare, success)
        except EtcdIndeterminate:
            continue  # the next snapshot tells whether it won
        except LeaseNotFound as e:
            raise SessionLost(f"lease {session.lease_id:x} is gone") from e
        if r.succeeded:
            info = LeaderInfo(me.node, me.addr, epoch, session.lease_id, r.header.revision)
            return Leadership(etcd, keys, session, info), r.header.revision
        return None, r.header.revision
    raise EtcdUnavailable("campaign: the outcome of the takeover stayed unknown")


async def campaign_once(etcd: EtcdClient, keys: ClusterKeys, session: Session, me: Member) -> Leadership | None:
    """One try: the leadership if this node took over, None if another node leads
    (or this node is not in the in-sync set)."""
    if session.lost.is_set():
        raise SessionLost("the session is over")
    won, _ = await _attempt(etcd, keys, session, me)
    return won


async def campaign(etcd: EtcdClient, keys: ClusterKeys, session: Session, me: Member, *,
                   recheck: float = 2.0, idle_timeout: float = 5.0) -> Leadership:
    """Try until this node is leader: after each lost try, wait for the leader key to
    change (or at most ``recheck`` seconds) and try again.  Cancel to give up."""
    while True:
        if session.lost.is_set():
            raise SessionLost("the session is over")
        try:
            won, revision = await _attempt(etcd, keys, session, me)
        except EtcdUnavailable:
            await trio.sleep(min(recheck, 0.5))
            continue
        if won is not None:
            return won
        await _wait_for_change(etcd, keys, session, revision, recheck, idle_timeout)


async def _wait_for_change(etcd: EtcdClient, keys: ClusterKeys, session: Session, revision: int, recheck: float,
                           idle_timeout: float) -> None:
    """Until the leader key changes after ``revision``, the session is lost, or ``recheck`` passes."""
    async with trio.open_nursery() as nursery:

        async def on_session_lost() -> None:
            await session.lost.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(on_session_lost)
        with trio.move_on_after(recheck):
            try:
                async with etcd.watch(keys.leader, start_revision=revision + 1, idle_timeout=idle_timeout) as w:
                    await w.__anext__()
            except EtcdException:  # the next attempt will say what is wrong, unwrapped
                await trio.sleep(min(recheck, 0.5))
        nursery.cancel_scope.cancel()
