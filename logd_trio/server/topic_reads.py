"""What readers use of a topic: planning a READ of what is acknowledged (and verified), SEEK,
and the wait for new data.  A mixin of :class:`~logd_trio.server.topic.Topic`, which owns the
state (the topic task publishes ``visible_head`` and sets ``_new_data``)."""

from __future__ import annotations

from collections.abc import Callable

import trio

from logd_trio.core.errors import NotFound, StorageError
from logd_trio.server.blocking import run_blocking
from logd_trio.server.limits import TopicFds
from logd_trio.server.reasons import TopicDeleted
from logd_trio.server.storage.reads import ReadPlan
from logd_trio.server.storage.rebuild import IndexSuspect
from logd_trio.server.storage.topic_log import TopicLog
from logd_trio.server.verifier import Verifier

__all__ = ["TopicReads"]

# Rounds of verify-then-plan-again a read may take (one, two after an index rebuild).
_VERIFY_ROUNDS = 4


class TopicReads:
    """The reading half of a topic (the attributes are the topic's)."""

    name: str
    log: TopicLog
    visible_head: int  # acknowledged head: batches at or past it are not served yet
    deleted: bool
    closed: bool
    fds: TopicFds
    verifier: Verifier
    read_cap: Callable[[], int] | None
    _new_data: trio.Event
    _garbage: trio.Event  # wakes the remover (Topic._remove)
    _lent = 0  # borrowed READ plans still sending from the partitions' own fds (lend())
    _returned: trio.Event | None = None
    _close_pending = False  # the task ended while a plan was lent: release_files() closes the files

    def lend(self) -> None:
        """A borrowed plan goes on sending from the partitions' own fds past a wait (they could not
        be dup'ed, e.g. EMFILE): until :meth:`give_back` no partition is removed, cut or closed
        (the sender retries the dup at each wait, so a lend lasts only while the dup fails)."""
        self._lent += 1

    def give_back(self) -> None:
        self._lent -= 1
        if not self._lent:
            if self._returned is not None:
                self._returned.set()
                self._returned = None
            if self.log.removal_pending:
                self._garbage.set()  # the removal postponed while lent (Topic._remove)

    async def until_returned(self) -> None:
        """Return once no borrowed plan is lent out (no checkpoint when none is)."""
        while self._lent:
            if self._returned is None:
                self._returned = trio.Event()
            await self._returned.wait()

    def close_files(self) -> None:
        """Close the log's files without a sync; while a plan is lent, :meth:`release_files` does it
        once the last one is back (the topic's end never waits for a reader's send)."""
        if self._lent:
            self._close_pending = True
        else:
            self.log.close_without_sync()

    async def release_files(self) -> None:
        """After the topic's task ended (its owner calls it): once no plan is lent any more, the
        removal retention postponed while lent, then the close.  Not for a deleted topic's removal:
        its directory is gone, and its paths may name the files of the topic created anew."""
        while self._close_pending:
            await self.until_returned()
            job = None if self.deleted else self.log.remove_job()
            if job is None:
                self._close_pending = False
                self.log.close_without_sync()  # (no checkpoint since none was lent)
                return
            with trio.CancelScope(shield=True):  # out of the log already: a removal always completes
                await run_blocking(job.run)

    @property
    def first(self) -> int:
        return self.log.first

    async def open_read(self, offset: int, limit: int, borrow: bool = False, upto: int | None = None) -> ReadPlan:
        """The acknowledged batches from ``offset`` (message sum below ``limit``), every frame verified:
        frames the scrub has not reached yet are verified first (worker thread), then planned again;
        the plan stops before a corrupt batch.  Raises :class:`NotFound`, ``CorruptData`` (at
        ``offset``) or :class:`StorageError`.  The caller closes the plan; cancelled: nothing to close.
        ``borrow``: a borrowed plan (``ReadPlan.own``), returned at once when nothing needs verifying.
        ``upto``: stop there too (a pipelined READ sees no batch its connection sent after it)."""
        if self.deleted:
            raise TopicDeleted(self.name)
        for _ in range(_VERIFY_ROUNDS):
            readable = self.readable_head if upto is None else min(upto, self.readable_head)
            if offset >= readable:
                raise NotFound(offset)
            try:
                plan = self.log.read_plan(offset, limit, end=readable,
                                          max_partitions=self.fds.max_partitions(), borrow=borrow)
                if not plan.checks:
                    return self.fds.hold(plan)
                await self.verifier.check(plan)
            except IndexSuspect as e:  # the log and its index disagree: rebuild it, plan again
                await self.verifier.rebuild(e)
        raise StorageError(f"topic {self.name}: could not verify the read at {offset}")

    def seek(self, when_ms: int) -> int:
        """Offset of the first readable batch appended at or after ``when_ms`` (Unix ms); the readable
        head if none.  Raises :class:`TopicDeleted` or :class:`StorageError`."""
        if self.deleted:
            raise TopicDeleted(self.name)
        return max(self.first, self.log.seek(when_ms, self.readable_head))

    @property
    def readable_head(self) -> int:  # the acknowledged head, capped at the high watermark (replication)
        return self.visible_head if self.read_cap is None else max(self.first, min(self.visible_head, self.read_cap()))

    def wake_readers(self) -> None:  # the cap moved: waiting readers look again
        self._new_data.set()
        self._new_data = trio.Event()

    async def wait_for_data(self, offset: int, *, capped: bool = True) -> None:
        """Return once the readable (``capped``) or acknowledged head moves past ``offset`` (caller bounds the wait)."""
        while (self.readable_head if capped else self.visible_head) <= offset and not self.closed:
            await self._new_data.wait()
