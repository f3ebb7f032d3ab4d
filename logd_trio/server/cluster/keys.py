"""The data a logd cluster keeps in etcd: key names, members, the leader key, the
in-sync set, and the errors about them.  Pure (no I/O).

Keys under ``/logd/<cluster>/``:

- ``cluster_id``: created once; a node remembers it and refuses another one.
- ``members/<node>``: ``{"node", "addr"}``, on the node's session lease.
- ``leader``: ``{"node", "addr", "epoch"}``, on the leader's session lease.
- ``epoch``: the last epoch handed out (decimal); never deleted.
- ``isr``: ``{"epoch", "members"}``, the in-sync set; only its members may take over.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from logd_trio.server.cluster.etcd_wire import EtcdBadReply, EtcdException, KeyValue, RangeResult

__all__ = [
    "NAME", "ClusterDataError", "ClusterKeys", "ClusterMismatch", "InSync", "LeaderInfo", "Member",
    "SessionLost", "check_name", "epoch_of", "json_obj", "kvs_of",
]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ClusterDataError(EtcdException):
    """A key of the cluster holds something this version cannot read."""


class SessionLost(EtcdException):
    """The session's lease is gone: open a new session."""


class ClusterMismatch(EtcdException):
    """etcd is not the one this node joined (another cluster id, or an epoch below
    the node's own: etcd wiped, restored, or a wrong endpoint): the node must not run."""


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
        d = json_obj(kv)
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
        d = json_obj(kv)
        epoch, members = d.get("epoch"), d.get("members")
        if not (isinstance(epoch, int) and isinstance(members, list) and all(isinstance(m, str) for m in members)):
            raise ClusterDataError(f"{kv.key.decode(errors='replace')}: expected epoch and members")
        return cls(epoch, tuple(members))

    def to_json(self) -> str:
        return json.dumps({"epoch": self.epoch, "members": list(self.members)})


def json_obj(kv: KeyValue) -> dict[str, object]:
    try:
        d = json.loads(kv.value)
    except ValueError:
        d = None
    if not isinstance(d, dict):
        raise ClusterDataError(f"{kv.key.decode(errors='replace')}: not a JSON object: {kv.value[:60]!r}")
    return d


def epoch_of(kv: KeyValue | None) -> int:
    if kv is None:
        return 0
    try:
        return int(kv.value)
    except ValueError:
        raise ClusterDataError(f"{kv.key.decode(errors='replace')}: not an epoch: {kv.value[:30]!r}") from None


def kvs_of(responses: Sequence[object], what: str) -> list[KeyValue | None]:
    """The key (or None) each Get of a txn found."""
    out: list[KeyValue | None] = []
    for resp in responses:
        if not isinstance(resp, RangeResult):
            raise EtcdBadReply(f"{what}: a read answered as a write")
        out.append(resp.kvs[0] if resp.kvs else None)
    return out


