"""The server's topics: lookup, creation on the first BATCH, and the topic limits.

Owned by :func:`logd_trio.server.app.serve`; connections look topics up here and the
stats task samples them.  Each topic's task runs in the nursery handed in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import trio

from logd_trio.core.errors import RequestError, StorageError
from logd_trio.server.config import ServerConfig
from logd_trio.server.limits import READ_POOL_FDS, SYNC_RESERVE_FDS, ReadFdPool, TopicFds
from logd_trio.server.replica.state import ReplicaState
from logd_trio.server.stats import Counters, TopicView
from logd_trio.server.storage import usage
from logd_trio.server.storage.files import list_topics
from logd_trio.server.topic import Topic

__all__ = ["Registry"]

log = logging.getLogger("logd_trio.server.registry")


class Registry:
    """The server's topics: lookup, creation on first BATCH, and their limits."""

    def __init__(self, config: ServerConfig, nursery: trio.Nursery, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self.root = Path(config.workdir)
        self.topics: dict[str, Topic] = {}
        self.accepting = False  # listening and not shutting down (for /readyz)
        self._nursery = nursery
        self._creating: dict[str, trio.Event] = {}
        self._created = trio.Event()
        # The duplicates READ plans may hold beyond their first partition, shared by every topic.
        self.read_fds = ReadFdPool(READ_POOL_FDS)
        self.replica = ReplicaState(config)  # role, leader epoch, epoch files, followers' progress

    def get(self, name: str) -> Topic | None:
        return self.topics.get(name)

    async def wait_created(self) -> None:
        """Return once any new topic has been created."""
        await self._created.wait()

    async def get_or_create(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is not None:
            return topic
        wl = self.config.topics_whitelist
        if wl and name not in wl:
            self.counters.topics_disallowed += 1
            raise RequestError("topic not allowed")
        while name in self._creating:
            await self._creating[name].wait()
            topic = self.topics.get(name)
            if topic is not None:
                return topic
        if len(self.topics) + len(self._creating) >= self.config.topics:
            raise RequestError("maximum topics allowed")
        return await self._start(name)

    async def _start(self, name: str) -> Topic:
        event = self._creating[name] = trio.Event()
        try:
            try:
                topic = await trio.to_thread.run_sync(self.replica.open_topic, self.root, name)
            except (OSError, StorageError) as e:
                # Details (paths) go to the log, not to the client.
                log.error("cannot open topic %s: %s", name, e)
                cause = e if isinstance(e, OSError) else e.__cause__
                why = cause.strerror if isinstance(cause, OSError) and cause.strerror else "see the server log"
                raise StorageError(f"cannot open topic {name}: {why}") from e
            topic.histograms = self.counters.histograms
            topic.fds = TopicFds(SYNC_RESERVE_FDS, self.read_fds)
            await self._nursery.start(self._run, topic)  # _run closes topic.fds when the topic ends
            self.topics[name] = topic
            self._created.set()
            self._created = trio.Event()
            log.debug("topic %s: open, first=%d head=%d", name, topic.first, topic.visible_head)
            return topic
        finally:
            del self._creating[name]
            event.set()

    @staticmethod
    async def _run(topic: Topic, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await topic.run(task_status=task_status)
        finally:
            topic.fds.close()  # the sync reserve, once the topic's last fsync is done

    async def open_existing(self) -> None:
        """Recover every topic on disk (and ``default``) before the listener opens."""
        await trio.to_thread.run_sync(self.replica.load)
        names = await trio.to_thread.run_sync(list_topics, self.root)
        if "default" not in names:
            names.append("default")
        if len(names) > self.config.topics:
            log.warning("%d topics on disk exceed --topics=%d; all are served, no new ones accepted",
                        len(names), self.config.topics)
        for name in sorted(names):
            await self._start(name)

    def views(self) -> Mapping[str, TopicView]:
        """What STATS and TOPICS report of each topic, sampled now."""
        return {n: TopicView(t.first, t.visible_head, t.fsyncs, t.synced_batches, bytes_=t.log.head - t.first,
                             batches=usage.batches(t.log), last_append=usage.last_write(t.log))
                for n, t in self.topics.items()}

    def close_inputs(self) -> None:
        for t in self.topics.values():
            t.close_input()
