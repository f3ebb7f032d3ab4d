"""The server's topics: lookup, creation on the first BATCH, deletion (DELETE), and the topic limits.

Owned by :func:`logd_trio.server.app.serve`; connections look topics up here and the
stats task samples them.  Each topic's task runs in the nursery handed in.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from pathlib import Path

import trio

from logd_trio.core.errors import NotFound, RequestError, StorageError
from logd_trio.server.auth import Principal
from logd_trio.server.blocking import run_blocking
from logd_trio.server.config import ServerConfig
from logd_trio.server.limits import READ_POOL_FDS, SYNC_RESERVE_FDS, ReadFdPool, TopicFds
from logd_trio.server.replica.state import ReplicaState
from logd_trio.server.stats import Counters, TopicView
from logd_trio.server.storage import usage
from logd_trio.server.storage.files import list_topics, remove_deleted, remove_topic
from logd_trio.server.topic import Append, Topic
from logd_trio.server.wallclock import now_ms

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
        self._deleting: dict[str, trio.Event] = {}  # a BATCH for one of these waits, then creates it anew
        self._ended: dict[str, trio.Event] = {}  # set when the topic's task has closed its files
        self._created = trio.Event()
        self._creator: dict[str, str] = {}  # topic -> the principal that created it while the server runs
        self._created_by: collections.Counter[str] = collections.Counter()  # and its count, per principal
        # The duplicates READ plans may hold beyond their first partition, shared by every topic.
        self.read_fds = ReadFdPool(READ_POOL_FDS)
        self.replica = ReplicaState(config, counters)  # role, leader epoch, epoch files, followers' progress

    def get(self, name: str) -> Topic | None:
        return self.topics.get(name)

    async def wait_created(self) -> None:
        """Return once any new topic has been created."""
        await self._created.wait()

    async def get_or_create(self, name: str, creator: str = "", quota: int | None = None) -> Topic:
        """The topic ``name``, created if new.  ``creator`` (a principal) may create at most
        ``quota`` topics while the server runs (None: no quota of its own)."""
        topic = self.topics.get(name)
        if topic is not None:
            return topic
        wl = self.config.topics_whitelist
        if wl and name not in wl:
            self.counters.topics_disallowed += 1
            raise RequestError("topic not allowed")
        while name in self._creating or name in self._deleting:
            await self._busy(name).wait()
            topic = self.topics.get(name)
            if topic is not None:
                return topic
        if len(self.topics) + len(self._creating) >= self.config.topics:
            raise RequestError("maximum topics allowed")
        if quota is not None and self._created_by[creator] >= quota:
            self.counters.topics_disallowed += 1
            raise RequestError(f"maximum topics allowed for {creator} ({quota})")
        if creator:
            self._creator[name] = creator
            self._created_by[creator] += 1
        try:
            topic = await self._start(name)
        except BaseException:
            self._forget_creator(name)
            raise
        log.info("topic %s created%s", name, f" by {creator}" if creator else "")
        return topic

    def _forget_creator(self, name: str) -> None:
        creator = self._creator.pop(name, None)
        if creator is not None:
            self._created_by[creator] -= 1

    async def append(self, name: str, frame: bytes, count: int, who: Principal | None = None,
                     direct: bool = True) -> Append:
        """Queue a BATCH on ``name`` (created if new).  A BATCH that meets the topic's deletion
        (queued on its closed inbox, or waiting for room in it) goes to the topic created anew.
        ``who``: the connection's principal (``--auth-file``), whose ``max_topics`` applies.
        ``direct``: appended at once if the topic task is idle (False: more batches follow, so
        the task takes them all in one wake-up and acknowledges them together)."""
        while True:
            topic = self.topics.get(name) or await self.get_or_create(name, *(
                (who.name, who.max_topics) if who is not None else ()))
            try:
                # at once when the topic task is idle (Topic.append_now), else queued at the task
                return ((direct and topic.append_now(frame, count)) or topic.try_append(frame, count)
                        or await topic.append(frame, count))
            except trio.ClosedResourceError:
                if not topic.deleted:
                    raise  # the server is shutting down


    def _busy(self, name: str) -> trio.Event:
        """The event that ends the creation or deletion of ``name`` under way."""
        event = self._creating.get(name)
        return event if event is not None else self._deleting[name]

    async def _start(self, name: str) -> Topic:
        event = self._creating[name] = trio.Event()
        try:
            try:
                topic = await run_blocking(self.replica.open_topic, self.root, name, now_ms())
            except (OSError, StorageError) as e:
                # Details (paths) go to the log, not to the client.
                log.error("cannot open topic %s: %s", name, e)
                cause = e if isinstance(e, OSError) else e.__cause__
                why = cause.strerror if isinstance(cause, OSError) and cause.strerror else "see the server log"
                raise StorageError(f"cannot open topic {name}: {why}") from e
            topic.histograms = self.counters.histograms
            topic.fds = TopicFds(SYNC_RESERVE_FDS, self.read_fds)
            ended = self._ended[name] = trio.Event()
            await self._nursery.start(self._run, topic, ended)  # _run closes topic.fds when the topic ends
            self.topics[name] = topic
            self._created.set()
            self._created = trio.Event()
            log.debug("topic %s: open, first=%d head=%d", name, topic.first, topic.visible_head)
            return topic
        finally:
            del self._creating[name]
            event.set()

    @staticmethod
    async def _run(topic: Topic, ended: trio.Event, *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await topic.run(task_status=task_status)
        finally:
            topic.fds.close()  # the sync reserve, once the topic's last fsync is done
            ended.set()
        await topic.release_files()  # what a READ still sending from the partitions' own fds kept open

    async def delete(self, name: str, *, by: str = "") -> int:
        """``DELETE``: the topic leaves the server and its files are removed; returns the bytes freed.

        Its task stops first: batches already queued are still written, made durable and
        answered; a long-poll waiting on it answers ``ERR topic deleted``; a BATCH arriving
        meanwhile waits and then creates the topic anew.  The files are removed in a worker
        thread once the task has closed them (:func:`~logd_trio.server.storage.files.remove_topic`:
        renamed aside first, so a crash never leaves part of a topic).  Raises
        :class:`NotFound` for an unknown topic and :class:`RequestError` on a follower or once
        followers replicate from this node (a deletion is not replicated).
        """
        self.replica.refuse_writes()
        if self.replica.followers:
            raise RequestError("not supported: followers replicate this server (a deletion is not replicated)")
        while name in self._creating or name in self._deleting:
            await self._busy(name).wait()
        topic = self.topics.get(name)
        if topic is None:
            raise NotFound(name)
        done = self._deleting[name] = trio.Event()
        try:
            del self.topics[name]
            self._forget_creator(name)
            topic.deleted = True
            topic.close_input()
            # Out of the server already: the deletion completes (the topic's end is bounded by its
            # final sync's --shutdown-timeout).
            with trio.CancelScope(shield=True):
                await self._ended.pop(name).wait()
                self.replica.forget(name)  # its epochs, and what a cluster leader noted of it
                first, head = topic.first, topic.visible_head
                try:
                    freed = await run_blocking(remove_topic, self.root, name, log)
                except OSError as e:
                    log.error("topic %s: cannot delete it: %s; it is served again", name, e)
                    await self._start(name)
                    raise StorageError(f"cannot delete topic {name}: {e.strerror or e}") from e
        finally:
            del self._deleting[name]
            done.set()
        log.info("topic %s deleted%s: offsets %d..%d, %d bytes freed", name, f" by {by}" if by else "", first,
                 head, freed)
        return freed

    async def open_existing(self) -> None:
        """Recover every topic on disk (and ``default``) before the listener opens."""
        await run_blocking(self.replica.load)
        await run_blocking(remove_deleted, self.root, log)  # deletions a crash interrupted
        names = await run_blocking(list_topics, self.root)
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
