"""What a node tells about its replication: ``CLUSTER`` and ``EPOCHS`` replies, and the numbers STATS
and /metrics sample (a part of :class:`~logd_trio.server.replica.state.ReplicaState`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import trio

from logd_trio.core.requests import Cluster, Epochs
from logd_trio.server.replica.marks import Watermarks
from logd_trio.server.stats import Counters
from logd_trio.server.storage.epochs import EpochFile
from logd_trio.server.topic import Topic

__all__ = ["FollowerProgress", "Reporting"]


@dataclass(slots=True)
class FollowerProgress:
    """What one follower acknowledged of one topic (its next fetch offset), when it last fetched it,
    and when it was last caught up with the leader's durable head (the in-sync rule)."""

    offset: int
    at: float
    caught_up: float
    replied_head: int = -1  # the leader's head when it last answered this follower (-1: not answered yet)
    polling: int = 0  # long-polls of this follower waiting at the head now (it has everything meanwhile)
    told_hw: int = -1  # the high watermark of the last answer (a long-poll answers at once when it moves)
    joined: float = 0.0  # when this node first fetched this topic (its lag before it was ever caught up)


class Reporting:
    """The reporting part of ReplicaState (which sets these attributes)."""

    node_id: str
    leader: str
    address: str
    epoch: int
    history: str
    halted: str | None
    clustered: bool
    isr_size: int
    acks_waiting: int
    counters: Counters
    marks: Watermarks
    epochs: dict[str, EpochFile]
    topics: dict[str, Topic]
    leader_heads: dict[str, int]
    describe: Callable[[], dict[str, object]]
    followers: dict[tuple[str, str], FollowerProgress]

    def in_sync(self, now: float) -> set[str]:  # ReplicaState's
        raise NotImplementedError

    def extension_reply(self, req: Cluster | Epochs) -> bytes:
        if isinstance(req, Epochs):
            return self.epochs_reply(req.topic)
        body = json.dumps({"history": self.history} if req.history else self.describe(), sort_keys=True).encode()
        return b"MOK %d\r\n%s\r\n" % (len(body), body)

    def epochs_reply(self, name: str) -> bytes:
        """``EPOCHS <topic>``: the topic's leader-epoch entries and durable head (a follower compares
        its own after a leader change, and cuts what the leader does not have)."""
        topic, ef = self.topics.get(name), self.epochs.get(name)
        if topic is None or ef is None:
            return b"ERR unknown topic %s\r\n" % name.encode()
        body = {"epochs": ef.entries, "first": topic.first, "head": topic.visible_head, "epoch": self.epoch}
        return b"MOK %d\r\n%s\r\n" % (len(b := json.dumps(body).encode()), b)

    def _describe(self) -> dict[str, object]:
        """``CLUSTER`` of a plain leader or follower (a cluster node's is clustering.py's)."""
        now = trio.current_time()
        role = "follower" if self.leader else "leader"
        followers: dict[str, dict[str, object]] = {}
        for (n, name), p in self.followers.items():
            head = t.visible_head if (t := self.topics.get(name)) is not None else p.offset
            followers.setdefault(n, {})[name] = {
                "offset": p.offset, "lag_bytes": max(0, head - p.offset),
                "caught_up_ago": round(now - p.caught_up, 3) if p.caught_up > -1e300 else None}
        out: dict[str, object] = {
            "node": self.node_id, "role": role, "epoch": self.epoch, "history": self.history,
            "leader": {"addr": self.leader or self.address, "epoch": self.epoch},
            "refusal": f"not leader {self.leader}" if self.leader else None, "followers": followers,
            "topics": {n: {"first": t.first, "head": t.visible_head, "hw": t.readable_head}
                       for n, t in self.topics.items()}}
        if not self.leader:
            out["in_sync"] = sorted(self.in_sync(now))
        if self.halted is not None:
            out["halted"] = self.halted
        return out

    def gauges(self) -> dict[str, int]:
        """The replication numbers STATS and /metrics sample (stats.py, metrics.py)."""
        now = trio.current_time()
        lag_bytes, lag_s = 0, 0.0
        if self.leader:  # a follower: how far behind the leader's heads it last heard of
            for name, head in self.leader_heads.items():
                if (t := self.topics.get(name)) is not None:
                    lag_bytes += max(0, head - t.visible_head)
        for (_, name), p in self.followers.items():
            if (t := self.topics.get(name)) is not None:
                lag_bytes = max(lag_bytes, t.visible_head - p.offset)
            if not p.polling:
                lag_s = max(lag_s, now - max(p.caught_up, p.joined))
        insync = self.isr_size if self.clustered else (0 if self.leader else len(self.in_sync(now)) + 1)
        c = self.counters
        return {"bytes_fetched": c.fetch_bytes_in, "bytes_served": c.fetch_bytes_out, "lag_bytes": lag_bytes,
                "lag_ms": int(lag_s * 1000), "insync": insync, "acks_waiting": self.acks_waiting,
                "halted": int(self.halted is not None), "hw_checkpoints": self.marks.checkpoints}
