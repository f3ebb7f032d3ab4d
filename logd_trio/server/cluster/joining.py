"""When a follower may join a leader's in-sync set: pure bookkeeping of one leadership (no I/O, no
Trio; times are plain seconds), tested in isolation.

A joiner must hold everything that was acknowledged (or shown to a reader) before the leader
waits for it: once in the set in etcd it may be the next leader.  Two fixed targets make that
both safe and reachable by a follower that keeps up with a steady load, one step behind the head:

1. when the follower is first seen as a candidate, a **snapshot** of each topic's floor;
2. once it holds the snapshot, it is **waited for** (every acknowledgement from then on waits for
   its copy too) and must reach the floor of that moment: nothing acknowledged before it was
   waited for is missing from it when it joins.  A joiner waited for that does not get there within
   ``--replica-lag`` stops being waited for and starts over.

The floor of a topic never goes back within a leadership: it is the highest of the head this
leader took over with (the earlier epochs' acknowledged batches), the ends of the batches it
acknowledged, and the high watermarks it has shown readers.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["Joins"]


class Joins:
    """One leadership's join floors and joiners.  ``changed`` is set when the joiners waited for
    changed (the caller then publishes who acknowledgements wait for, before anything else runs)."""

    def __init__(self, takeover_heads: Mapping[str, int] | None = None) -> None:
        self.marks: dict[str, int] = dict(takeover_heads or {})
        self.snapshots: dict[str, dict[str, int]] = {}  # phase 1: node -> topic -> floor
        self.waited: dict[str, tuple[float, dict[str, int]]] = {}  # phase 2: node -> (since, targets)
        self.changed = False

    def floor(self, topic: str, *seen: int) -> int:
        """The topic's floor, first raised to any of ``seen`` (an acknowledged end, a high watermark)."""
        mark = max((self.marks.get(topic, 0), *seen))
        self.marks[topic] = mark
        return mark

    def forget(self, node: str) -> None:
        """``node`` is in the set (or gone): a later join starts over."""
        self.snapshots.pop(node, None)
        if self.waited.pop(node, None) is not None:
            self.changed = True

    def admit(self, node: str, held: Mapping[str, int | None], floors: Mapping[str, int], now: float,
              lag: float) -> bool:
        """May ``node``, which holds ``held`` (None: has not fetched the topic), join now?  ``floors``:
        each topic's floor now (see :meth:`floor`)."""
        waited = self.waited.get(node)
        if waited is None:
            snap = self.snapshots.setdefault(node, {})
            for topic, f in floors.items():
                snap.setdefault(topic, f)  # a topic new since: its floor when first seen
            if not _holds(held, snap, floors):
                return False
            waited = self.waited[node] = (now, dict(floors))
            self.changed = True
        since, targets = waited
        for topic, f in floors.items():
            targets.setdefault(topic, f)
        if _holds(held, targets, floors):
            return True
        if now - since > lag:  # fell behind while waited for: acknowledgements stop waiting for it
            self.forget(node)
        return False


def _holds(held: Mapping[str, int | None], targets: Mapping[str, int], topics: Mapping[str, int]) -> bool:
    return all((h := held.get(t)) is not None and h >= targets[t] for t in topics)
