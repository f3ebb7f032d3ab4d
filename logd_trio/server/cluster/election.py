"""Membership and leader election of logd nodes in etcd (the keys: keys.py).

A takeover is one txn: the leader key does not exist, the epoch and the in-sync
set are what the candidate read; then it puts the leader key (on its lease), the
epoch + 1 and the in-sync set stamped with the new epoch.  So epochs are dense and
strictly increasing, two leaders can never hold one epoch, and only an in-sync
node can win.  A node's epoch is its fencing token.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import trio

from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.etcd_wire import (
    Compare,
    Delete,
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
from logd_trio.server.cluster.keys import (
    NAME,
    ClusterDataError,
    ClusterKeys,
    ClusterMismatch,
    InSync,
    LeaderInfo,
    Member,
    SessionLost,
    epoch_of,
    json_obj,
    kvs_of,
)
from logd_trio.server.cluster.session import Session

__all__ = [
    "ClusterDataError", "ClusterKeys", "ClusterMismatch", "InSync", "LeaderInfo", "Leadership", "Member",
    "SessionLost", "campaign", "campaign_once", "current_leader", "ensure_cluster_id", "follow_leader",
    "list_members", "register",
]

# ---------------------------------------------------------------- membership

async def ensure_cluster_id(etcd: EtcdClient, keys: ClusterKeys, proposed: str, *, create: bool = True) -> str:
    """The cluster's id: ``proposed`` if this call created it, else the one already
    there.  With ``create=False`` (a node that already joined a cluster) an etcd
    without an id is ClusterMismatch: it was wiped, or it is the wrong one."""
    if not create:
        kv = await etcd.get(keys.cluster_id)
        if kv is None:
            raise ClusterMismatch(f"etcd holds no id for cluster {keys.cluster!r} although this node joined it "
                                  f"as {proposed!r}: etcd wiped or restored, or a wrong endpoint")
        return kv.value.decode(errors="replace")
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
    """Put this node's member key on its session lease (it vanishes with the session).
    A lost reply is resent (the same value on the same lease: applying it twice is
    harmless) or, after three, read back."""
    key, value = keys.member(me.node), me.to_json()
    try:
        for _ in range(3):
            try:
                await etcd.put(key, value, lease=session.lease_id)
                return
            except EtcdIndeterminate:
                continue
        kv = await etcd.get(key)
    except LeaseNotFound as e:
        raise SessionLost(f"lease {session.lease_id:x} is gone") from e
    if kv is None or kv.lease != session.lease_id or kv.value != value.encode():
        raise EtcdUnavailable(f"{key}: registration not confirmed (replies lost)")


async def list_members(etcd: EtcdClient, keys: ClusterKeys) -> dict[str, Member]:
    out: dict[str, Member] = {}
    for kv in (await etcd.get_prefix(keys.members)).kvs:
        d = json_obj(kv)
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


async def follow_leader(etcd: EtcdClient, keys: ClusterKeys, on_change: Callable[[LeaderInfo | None, int], None],
                        *, idle_timeout: float = 5.0) -> None:
    """Call ``on_change(leader, revision)`` with the leader now, then at each change
    (None: no leader), with the revision it was seen at.  Runs until cancelled;
    raises EtcdUnavailable when etcd cannot be reached."""
    leader, revision = await current_leader(etcd, keys)
    on_change(leader, revision)
    async with etcd.watch(keys.leader, start_revision=revision + 1, idle_timeout=idle_timeout) as w:
        async for event in w:
            on_change(None if event.type == "DELETE" else LeaderInfo.from_kv(event.kv), event.kv.mod_revision)


# ---------------------------------------------------------------- leadership

class Leadership:
    """This node is leader of ``epoch`` while ``gate`` says so (see fencing.py).

    ``in_sync`` is the in-sync set as last confirmed in etcd, written at
    ``isr_revision`` (the takeover's revision at first).  Each write of the set
    compares that revision, so writes apply in the order the leader made them: a
    write whose reply was lost (EtcdIndeterminate) can land later only if no
    other write came after it.  From the moment a write is sent until a definite
    answer (success, or a failed compare that reads what etcd holds),
    ``in_sync_unsure`` holds the members of every such write: the caller must
    treat them as possibly in the set (the high watermark waits for the union),
    also when its own timeout or a cancel cut the call."""

    def __init__(self, etcd: EtcdClient, keys: ClusterKeys, session: Session, info: LeaderInfo, *,
                 in_sync: tuple[str, ...], isr_revision: int) -> None:
        self.etcd = etcd
        self.keys = keys
        self.session = session
        self.info = info
        self.gate = LeaderGate(info.epoch, session.clock)
        self.in_sync = in_sync
        self.isr_revision = isr_revision
        self.in_sync_unsure: tuple[str, ...] | None = None
        self.over = trio.Event()  # set when deposed: ends guard()

    def depose(self, reason: str) -> None:
        """From now on this leadership never acknowledges again."""
        self.gate.depose(reason)
        self.over.set()

    @property
    def epoch(self) -> int:
        return self.info.epoch

    def refusal(self) -> str | None:
        """None if this leader may acknowledge now, else the reason (``not leader: ...``)."""
        return self.gate.refusal(self.session.now())

    def _mine(self) -> Compare:
        return Compare.create_revision(self.keys.leader, self.info.create_revision)

    async def set_in_sync(self, members: tuple[str, ...]) -> bool:
        """Write the in-sync set, only while the leader key is still ours and the set
        is as this leader last wrote it (fenced and ordered); False (and deposed) if
        the key is not ours.  If the set changed since (an earlier write of ours
        whose reply was lost, landing late), adopt what etcd holds and write again.
        EtcdIndeterminate, or the call cut short (a timeout, a cancel): not known (see
        ``in_sync_unsure``); call again, which reads back what etcd holds."""
        if self.info.node not in members:
            raise ValueError("the leader is always in its in-sync set")
        value = InSync(self.epoch, members).to_json()
        for _ in range(3):
            compare = [self._mine(), Compare.mod_revision(self.keys.isr, self.isr_revision)]
            # Unknown from the moment it is sent until a definite answer: a reply lost, or the call
            # cut by a caller's timeout or cancel, may leave it applied in etcd.
            self._unsure(members)
            r = await self.etcd.txn(compare, [Put(self.keys.isr, value)],
                                    [Get(self.keys.leader), Get(self.keys.isr)])
            self.in_sync_unsure = None  # a definite answer: what etcd holds is known (read in the same txn)
            if r.succeeded:
                self.in_sync, self.isr_revision, self.in_sync_unsure = members, r.header.revision, None
                return True
            leader_kv, isr_kv = kvs_of(r.responses, "in-sync write")
            if leader_kv is None or leader_kv.create_revision != self.info.create_revision:
                self.depose("the leader key is no longer ours")
                return False
            if isr_kv is None:
                raise ClusterDataError(f"{self.keys.isr}: deleted while this node leads")
            self.in_sync, self.isr_revision = InSync.from_kv(isr_kv).members, isr_kv.mod_revision
        raise EtcdUnavailable("in-sync set: it kept changing under this leader")

    def _unsure(self, members: tuple[str, ...]) -> None:
        """``members`` may be in etcd: added to the sets not known (each compared the same revision,
        so any one of them may have landed, not two)."""
        self.in_sync_unsure = tuple(sorted(set(self.in_sync_unsure or ()) | set(members)))

    async def resign(self) -> None:
        """Stop acknowledging, then delete the leader key if it is still ours."""
        self.depose("resigned")
        await self.etcd.txn([self._mine()], [Delete(self.keys.leader)])

    async def guard(self, *, idle_timeout: float = 5.0) -> None:
        """Watch the leader key; returns once this leadership is over (the key gone
        or replaced, the session lost), with the gate deposed."""
        async with trio.open_nursery() as nursery:

            async def on_session_lost() -> None:
                await self.session.lost.wait()
                self.depose("the session's lease is gone")
                nursery.cancel_scope.cancel()

            async def on_deposed() -> None:  # deposed elsewhere (say, the node saw the key deleted)
                await self.over.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_session_lost)
            nursery.start_soon(on_deposed)
            while not self.gate.deposed:
                try:
                    await self._watch_key(idle_timeout)
                except EtcdException:  # unreachable, or a watch etcd cancelled: the lease deadline keeps us safe
                    await trio.sleep(min(0.5, self.session.clock.retry))
            nursery.cancel_scope.cancel()

    async def _watch_key(self, idle_timeout: float) -> None:
        r = await self.etcd.range(self.keys.leader)
        if not r.kvs or r.kvs[0].create_revision != self.info.create_revision:
            self.depose("the leader key is gone or another node's")
            return
        async with self.etcd.watch(self.keys.leader, start_revision=r.header.revision + 1,
                                   idle_timeout=idle_timeout) as w:
            async for event in w:
                if event.type == "DELETE" or event.kv.create_revision != self.info.create_revision:
                    self.depose("the leader key is gone or another node's")
                    return


async def _snapshot(etcd: EtcdClient, keys: ClusterKeys) -> tuple[list[KeyValue | None], int]:
    r = await etcd.txn([], [Get(keys.leader), Get(keys.epoch), Get(keys.isr)])
    return kvs_of(r.responses, "campaign"), r.header.revision


async def _attempt(etcd: EtcdClient, keys: ClusterKeys, session: Session, me: Member,
                   local_epoch: int) -> tuple[Leadership | None, int]:
    for _ in range(3):
        (leader_kv, epoch_kv, isr_kv), revision = await _snapshot(etcd, keys)
        if leader_kv is not None:
            info = LeaderInfo.from_kv(leader_kv)
            if info.node == me.node and info.lease == session.lease_id:  # an earlier attempt did win
                return _resumed(etcd, keys, session, info, isr_kv), revision
            return None, revision
        seen = epoch_of(epoch_kv)
        if seen < local_epoch:
            raise ClusterMismatch(f"etcd's epoch {seen} is below this node's {local_epoch}: etcd wiped or "
                                  f"restored, or a wrong endpoint")
        isr = InSync.from_kv(isr_kv) if isr_kv is not None else None
        if isr is None and (epoch_kv is not None or local_epoch > 0):
            raise ClusterDataError(f"{keys.isr}: missing although the cluster had a leader (epoch "
                                   f"{max(seen, local_epoch)}): no node may take over")
        if isr is not None and me.node not in isr.members:
            return None, revision  # not in sync: may not take over
        epoch = seen + 1
        value = json.dumps({"node": me.node, "addr": me.addr, "epoch": epoch})
        in_sync = InSync(epoch, isr.members if isr is not None else (me.node,))
        compare = [Compare.create_revision(keys.leader, 0),
                   Compare.mod_revision(keys.epoch, epoch_kv.mod_revision if epoch_kv else 0),
                   Compare.mod_revision(keys.isr, isr_kv.mod_revision if isr_kv else 0)]
        success = [Put(keys.leader, value, lease=session.lease_id), Put(keys.epoch, str(epoch)),
                   Put(keys.isr, in_sync.to_json())]
        try:
            r = await etcd.txn(compare, success, [Get(keys.leader), Get(keys.isr)])
        except EtcdIndeterminate:
            continue  # the next snapshot tells whether it won
        except LeaseNotFound as e:
            raise SessionLost(f"lease {session.lease_id:x} is gone") from e
        if r.succeeded:
            info = LeaderInfo(me.node, me.addr, epoch, session.lease_id, r.header.revision)
            return Leadership(etcd, keys, session, info, in_sync=in_sync.members,
                              isr_revision=r.header.revision), r.header.revision
        held, isr_now = kvs_of(r.responses, "takeover")
        if held is not None:  # an earlier attempt of ours, whose reply was lost, may have won meanwhile
            info = LeaderInfo.from_kv(held)
            if info.node == me.node and info.lease == session.lease_id:
                return _resumed(etcd, keys, session, info, isr_now), r.header.revision
        return None, r.header.revision
    raise EtcdUnavailable("campaign: the outcome of the takeover stayed unknown")


def _resumed(etcd: EtcdClient, keys: ClusterKeys, session: Session, info: LeaderInfo,
             isr_kv: KeyValue | None) -> Leadership:
    """The leadership an earlier attempt of ours won (its reply was lost)."""
    if isr_kv is None:
        raise ClusterDataError(f"{keys.isr}: missing although {info.node} leads")
    return Leadership(etcd, keys, session, info, in_sync=InSync.from_kv(isr_kv).members,
                      isr_revision=isr_kv.mod_revision)


async def campaign_once(etcd: EtcdClient, keys: ClusterKeys, session: Session, me: Member, *,
                        local_epoch: int = 0) -> Leadership | None:
    """One try: the leadership if this node took over, None if another node leads
    (or this node is not in the in-sync set).  ``local_epoch``: the highest epoch
    in this node's logs; etcd's epoch below it is ClusterMismatch."""
    if session.lost.is_set():
        raise SessionLost("the session is over")
    won, _ = await _attempt(etcd, keys, session, me, local_epoch)
    return won


async def campaign(etcd: EtcdClient, keys: ClusterKeys, session: Session, me: Member, *,
                   recheck: float = 2.0, idle_timeout: float = 5.0,
                   local_epoch: Callable[[], int] = lambda: 0) -> Leadership:
    """Try until this node is leader: after each lost try, wait for the leader key to
    change (or at most ``recheck`` seconds) and try again.  Cancel to give up."""
    while True:
        if session.lost.is_set():
            raise SessionLost("the session is over")
        try:
            won, revision = await _attempt(etcd, keys, session, me, local_epoch())
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
