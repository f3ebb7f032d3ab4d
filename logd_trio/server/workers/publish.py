"""The owner's side of the head table: each topic's head published before its OK goes out.

A topic gets a slot once the publisher attaches to it (at start and whenever a
topic is created); from then on :meth:`Topic._publish` calls
:meth:`Publisher.changed` on every acknowledgement, before any connection can
send the OKs it covers, and a deletion frees the slot before DELETE is answered.
A topic not attached yet has no slot: workers relay its reads (never wrong, only
slower).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from logd_trio.server.registry import Registry
from logd_trio.server.storage.topic_log import TopicLog
from logd_trio.server.topic import Topic
from logd_trio.server.workers.heads import HeadWriter

__all__ = ["Publisher", "flush_indexes", "trusted_from"]

log = logging.getLogger("logd_trio.server.workers")


def flush_indexes(tl: TopicLog) -> None:
    """Write the pending index records to the files (page cache only), so a worker's view of the
    index reaches the head about to be published.  A failed write leaves them pending (the
    topic logs it): a worker then finds the index short and relays."""
    for p in tl._parts:  # the partitions' own records: TopicLog keeps them private to its thread
        if p.idx.pending:
            try:
                p.idx.flush()
            except OSError as e:
                log.warning("topic %s: cannot write index of partition %d: %s", tl.topic, p.start, e)


def trusted_from(tl: TopicLog) -> int:
    """The offset from which every retained frame was written or verified by this process and none
    is known bad: a worker may serve from there; below it the owner verifies first."""
    base = 0
    for p in tl._parts:
        if p.vend:
            base = max(base, p.start + p.vend)
        if p.bad:
            base = max(base, p.start + p.bad.ends[-1])
    return base


def _unwatched(topic: Topic) -> None:
    pass


def _nothing() -> None:
    pass


class Publisher:
    """Attaches to the registry's topics and keeps their slots."""

    def __init__(self, registry: Registry, path: Path) -> None:
        self.registry = registry
        self.table = HeadWriter(path, registry.config.topics + 16)
        self._incarnations = 0
        self._gens: dict[int, tuple[int, int, int]] = {}  # id(topic) -> (incarnation, changes, key)
        self._keys: dict[int, tuple[int, int, bool, int]] = {}
        self._closed = False

    def attach_all(self) -> None:
        for topic in list(self.registry.topics.values()):
            if topic.on_change != self.changed:
                self._incarnations += 1
                self._gens[id(topic)] = (self._incarnations, 0, 0)
                topic.on_change = self.changed
                topic.verifier.on_verified = functools.partial(self.changed, topic)  # base moves down
                self.changed(topic)

    async def run(self) -> None:
        """Attach to every topic as it is created (until cancelled)."""
        while True:
            self.attach_all()
            await self.registry.wait_created()

    def changed(self, topic: Topic) -> None:
        """Called by the topic (its task, or DELETE) after its head, first or partitions moved (also
        after retention removed files: workers then reload and close them), and after a verification."""
        if self._closed:  # (a topic that missed the detach in close: nothing to publish to)
            return
        key = id(topic)
        if topic.deleted:
            if self.registry.topics.get(topic.name) in (None, topic):
                self.table.forget(topic.name)
            self._gens.pop(key, None)
            self._keys.pop(key, None)
            return
        tl = topic.log
        flush_indexes(tl)
        incarnation, changes, _ = self._gens.get(key, (0, 0, 0))
        if not incarnation:
            return
        shape = (tl.first, tl.rotations, tl.removal_pending, topic.verifier.rebuilds)
        if self._keys.get(key) != shape:
            self._keys[key] = shape
            changes += 1
            self._gens[key] = (incarnation, changes, 0)
        self.table.publish(topic.name, incarnation << 32 | changes, topic.readable_head, topic.first,
                           trusted_from(tl))

    def close(self) -> None:
        self._closed = True
        for topic in self.registry.topics.values():
            if topic.on_change == self.changed:
                topic.on_change = _unwatched
                topic.verifier.on_verified = _nothing
        self.table.close()

