"""One task per topic: the only code that appends to the topic's partitions.

Connections send :class:`Append` items over the topic's bounded channel.  The topic task writes
them to the page cache at once and, with ``fsync=always``, a *syncer* task fsyncs in a worker
thread while appends keep arriving; every batch a finished fsync covers is then acknowledged
together (group commit); while the task waits on an empty inbox, a connection makes the task's
write itself (:meth:`Topic.append_now`).  Reads and long-polls are served from the connection
tasks through :meth:`Topic.open_read` (server/topic_reads.py), which never shows a batch before
it is acknowledged nor a frame before it is verified.  Errors travel as exception objects
(``Append.error``, raised by ``open_read``)."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from pathlib import Path

import trio

from logd_trio.core.errors import StorageError
from logd_trio.server.appends import Append, Place
from logd_trio.server.blocking import run_blocking
from logd_trio.server.config import ServerConfig
from logd_trio.server.histogram import Histograms
from logd_trio.server.limits import TopicFds
from logd_trio.server.retention import expire_by_age
from logd_trio.server.storage.jobs import FilesGone, SyncJob
from logd_trio.server.storage.space import FreeSpace
from logd_trio.server.storage.topic_log import TopicLog
from logd_trio.server.topic_reads import TopicReads
from logd_trio.server.verifier import Verifier
from logd_trio.server.wallclock import now_ms

__all__ = ["Append", "Place", "Topic"]  # Append and Place: from server/appends.py

log = logging.getLogger("logd_trio.server.topic")

# How many appends may queue for one topic before senders wait (backpressure); each holds at most
INBOX_SIZE = 64  # one max-size batch, so this bounds memory per topic
_WAKE = Append(b"", 0)  # wakes the task for an early sync a direct append called for (append_now); never written


class Topic(TopicReads):
    """A topic's state shared by its task and by the connections that read it."""

    def __init__(self, name: str, tlog: TopicLog, config: ServerConfig) -> None:
        self.name = name
        self.log = tlog
        self.config = config
        self._send, self._recv = trio.open_memory_channel[Append](INBOX_SIZE)
        self.visible_head = tlog.head  # acknowledged (readable) head: batches at or past it are not served yet
        self._new_data = trio.Event()
        self._unacked: collections.deque[tuple[int, Append]] = collections.deque()
        self._dirty = trio.Event()
        self._garbage = trio.Event()  # retention dropped partitions: the remover unlinks them
        self._sync_lock = trio.Lock()
        self._idle = False  # the task waits on an empty inbox: append_now may write (every send clears it)
        self._direct = type(self) is Topic  # a follower's topic (replication) always takes the task
        self._sync_due = False  # a direct append wants an early sync: the task makes it (fsync never / interval)
        self._batches_since_sync = 0
        self._partitions_seen = tlog.rotations
        self.synced_batches = 0
        self.closed = False
        self.failed: StorageError | None = None  # set by a failed fsync: the topic refuses writes
        self.deleted = False  # set by Registry.delete: readers get TopicDeleted
        self._next_error_log = 0.0
        self._errors_unlogged = 0
        self._space = FreeSpace(Path(config.workdir) / name, config.min_free_space)
        self.verifier = Verifier(name, tlog, config.scrub_rate)
        self.histograms = Histograms()  # the server's own replace it (Registry)
        self.fds = TopicFds()  # for its fsyncs and READ plans; the server's own replaces it (Registry)
        self.read_cap: Callable[[], int] | None = None  # --acks all: readers stop at the high watermark
        self.on_change: Callable[[Topic], None] = lambda _topic: None  # --workers: server/workers/publish.py

    @classmethod
    def open(cls, root: Path, name: str, config: ServerConfig, now: int | None = None) -> Topic:
        """Open (recover) the topic's files; blocking, run it off the Trio thread for big topics."""
        tlog = TopicLog.open(root, name, partition_size=config.partition_size, partitions=config.partitions,
                             file_mode=config.file_mode, dir_mode=config.dir_mode, now_ms=now)
        return cls(name, tlog, config)

    @property
    def fsyncs(self) -> int:
        return self.log.fsync_count

    # ------------------------------------------------------------ producers

    async def append(self, frame: bytes, count: int, place: Place | None = None) -> Append:
        """Queue one batch (a replicated frame: at ``place``); the caller awaits ``item.done`` for its
        answer.  Cancelled while waiting for room in the inbox: nothing was queued."""
        item = Append(frame, count, place)
        self._idle = False
        await self._send.send(item)
        return item

    def append_now(self, frame: bytes, count: int) -> Append | None:
        """The append made at once, while the topic task waits on an empty inbox (else None: nothing
        done); answered on return, or with ``fsync=always`` once an fsync covers it (``item.done``).

        The task stays the partitions' only owner in effect: every send clears ``_idle`` (a batch
        queued ahead is written first), and this is the task's own synchronous step with no
        checkpoint in it, so appends serialize exactly as by the task.  An early sync it calls for
        is the task's (woken by :data:`_WAKE`, as after a wake-up of its own)."""
        if not self._idle:
            return None
        item = Append(frame, count)
        self.log.tick(now_ms())
        self._write(item)
        if self.config.fsync == "always":
            self._dirty.set()
        else:
            self._ack_upto(self.log.head)
            if self._needs_early_sync():
                self._sync_due, self._idle = True, False
                self._send.send_nowait(_WAKE)  # (the inbox is empty)
        return item

    def try_append(self, frame: bytes, count: int) -> Append | None:
        """:meth:`append` without a checkpoint; None (nothing queued) when the inbox is full.

        The hot path: a connection queues every batch of one receive before it
        yields, so the topic task takes them in one wake-up and the acks go out
        together.  Raises ``trio.ClosedResourceError`` once the input is closed.
        """
        item = Append(frame, count)
        self._idle = False
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            return None
        return item

    def close_input(self) -> None:
        """No more appends: the task drains what is queued, syncs and ends (on_change: DELETE)."""
        self._idle = False  # (the task never sets it again: its receives end the input)
        self._send.close()
        self.on_change(self)

    def _publish(self, head: int) -> None:
        if head > self.visible_head:
            self.visible_head = head
            self._new_data.set()
            self._new_data = trio.Event()
            self.log.acknowledge(head)
            if self.log.removal_pending:
                self._garbage.set()
            self.on_change(self)  # before any OK it covers is sent

    # ------------------------------------------------------------ the task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        mode = self.config.fsync
        try:
            async with self._recv, trio.open_nursery() as nursery:
                if mode == "always":
                    nursery.start_soon(self._syncer_always)
                elif mode == "interval":
                    nursery.start_soon(self._syncer_interval)
                nursery.start_soon(self.verifier.scrub)
                nursery.start_soon(self._remover)
                if self.config.retention_time:
                    nursery.start_soon(expire_by_age, self.log, self.config.retention_time, self._garbage_out,
                                       self.follows)
                task_status.started()
                while (item := await self._next()) is not None:
                    self.log.tick(now_ms())  # the time of this wake-up's batches (docs/storage.md)
                    self._write(item)
                    while True:  # take everything already queued before yielding
                        try:
                            item = self._recv.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        self._write(item)
                    if mode == "always":
                        self._dirty.set()
                    else:
                        self._ack_upto(self.log.head)
                        if self._needs_early_sync() or self._sync_due:
                            self._sync_due = False
                            await self._sync()
                # Input closed: wait for the syncer to cover everything, then stop it.
                if self._unacked:
                    await self._sync()
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            self._new_data.set()
            with trio.CancelScope(shield=True):
                await self._final_sync()

    async def _next(self) -> Append | None:
        """The next queued item, None once the input is closed and drained; while it waits on an
        empty inbox, :meth:`append_now` may write."""
        try:
            try:
                return self._recv.receive_nowait()
            except trio.WouldBlock:
                self._idle = self._direct
                return await self._recv.receive()
        except trio.EndOfChannel:
            return None
        finally:
            self._idle = False

    def _write(self, item: Append) -> None:
        if item is _WAKE:
            return
        try:
            if self.failed is not None:
                raise StorageError(str(self.failed))
            full = self._space.refuse(len(item.frame), trio.current_time())
            if full is not None:
                raise StorageError(full)
            offset = self._store(item)
        except StorageError as e:
            item.error = e
            if self._unacked:  # keep replies in order: fail after what precedes it is acked
                self._unacked.append((-1, item))
            else:
                item.done.set()
            now = time.monotonic()
            if now >= self._next_error_log:  # at most one line a second while the disk refuses
                cause = f" ({e.__cause__})" if isinstance(e.__cause__, OSError) else ""  # the log names the path
                log.error("topic %s: append failed: %s%s (%d more since the last report)", self.name, e, cause,
                          self._errors_unlogged)
                self._next_error_log = now + 1.0
                self._errors_unlogged = 0
            else:
                self._errors_unlogged += 1
            return
        item.offset = offset
        item.end = offset + len(item.frame)
        self._batches_since_sync += 1
        self._unacked.append((item.end, item))
        item.frame = b""  # in the page cache now: a pending ack need not pin 64 KB until it is sent

    def _store(self, item: Append) -> int:
        """Put the batch in the log (page cache); return its offset.  A follower's topic overrides it."""
        return self.log.append(item.frame, item.count)

    def _ack_upto(self, upto: int) -> int:
        """Answer every queued batch that ends at or before ``upto``; return how many."""
        unacked = self._unacked
        head = self.visible_head
        n = 0
        now, latency = time.perf_counter(), self.histograms.batch_latency
        while unacked and unacked[0][0] <= upto:
            end, item = unacked.popleft()
            if end > head:  # always, except for a refused batch (end -1): it is not observed
                head = end
                latency.observe(now - item.queued)
            item.done.set()
            n += 1
        self._publish(head)
        return n

    def _needs_early_sync(self) -> bool:
        fb = self.config.flush_batches
        if fb and self._batches_since_sync >= fb:
            return True
        marker = self.log.rotations
        if marker != self._partitions_seen:  # rotation: make the sealed partition durable
            self._partitions_seen = marker
            return True
        return False

    async def _sync(self) -> None:
        """fsync what is appended and acknowledge what that covers.

        Serialised by a lock: "nothing to sync" then really means every
        appended batch is durable, so acknowledging up to the head is right.
        """
        async with self._sync_lock:
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        if self.failed is not None:
            return
        self._batches_since_sync = 0
        try:
            with self.fds.for_sync():  # the job's duplicates take the reserve's slots
                job: SyncJob | None = self.log.sync_job()
        except StorageError as e:  # nothing synced or lost (e.g. EMFILE): retry; the batches wait
            await self.fds.sync_retry(self.name, e)
            self._dirty.set()
            return
        if job is None:
            self._ack_upto(self.log.head)
            return
        t0 = time.perf_counter()
        try:
            # Shielded: capturing the job counted its bytes as synced, so it must run (a cancel
            # before its thread starts would drop it unrun; once started it is never abandoned).
            with trio.CancelScope(shield=True):
                await run_blocking(self.fds.run_job, job)  # then the reserve takes its slots back
            self.log.check_linked(job)
        except OSError as e:
            self._fail_stop(f"fsync failed: {e.strerror or e}")
            return
        except FilesGone as e:  # never acknowledge into a file that is gone
            log.critical("topic %s: DATA FILE REMOVED OR REPLACED UNDER THE SERVER: %s; the batches written "
                         "to it since the last fsync are not acknowledged", self.name, e.path)
            self._fail_stop(str(e))
            return
        finally:
            job.close()  # a no-op once it ran; else its dup'ed fds must not leak
        self.histograms.fsync_latency.observe(time.perf_counter() - t0)
        covered = self._ack_upto(job.upto)
        self.synced_batches += covered
        if covered:  # with --fsync always; otherwise batches were acknowledged before their fsync
            self.histograms.batches_per_fsync.observe(covered)

    def _fail_stop(self, reason: str) -> None:
        """After a failed fsync nothing written since the last good one can be
        trusted (Linux drops the dirty pages and reports the error once): fail
        every unanswered batch, publish nothing more, refuse further writes.
        Reads of what was acknowledged before keep working; a restart
        recovers the files."""
        self.failed = StorageError(f"topic {self.name} is read-only after an I/O error ({reason}); "
                                   "restart the server")
        log.critical("topic %s: %s; %d unanswered batches fail; no further writes until a restart",
                     self.name, reason, len(self._unacked))
        self._fail_all(StorageError(reason))

    def _fail_all(self, error: StorageError) -> None:
        while self._unacked:
            _, item = self._unacked.popleft()
            item.error = item.error or error
            item.done.set()

    async def _syncer_always(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await self._sync()

    async def _syncer_interval(self) -> None:
        while True:
            await trio.sleep(self.config.flush_interval)
            await self._sync()

    def follows(self) -> bool:
        """Whether this node follows a leader for this topic now (then the leader decides retention)."""
        return False

    def _garbage_out(self) -> None:  # retention by age dropped partitions (published): the remover unlinks them
        self._garbage.set()
        self.on_change(self)

    async def _remover(self) -> None:
        """Unlink (and close) the partitions retention dropped, in a worker thread, oldest first."""
        while True:
            await self._garbage.wait()
            self._garbage = trio.Event()
            await self._remove()

    async def _remove(self) -> None:
        if self._lent:  # a lent plan sends from partitions it may drop: postponed until give_back()
            return
        job = self.log.remove_job()
        if job is not None:
            log.info("topic %s: retention removes %s (first offset now %d)", self.name,
                     ", ".join(p.name for p in job.paths if p.suffix == ".log"), self.log.first)
            with trio.CancelScope(shield=True):  # the partitions left the log: a removal always completes
                await run_blocking(job.run)
            self.log.removed()
            self.on_change(self)  # (workers close their descriptors of the removed files)
            self._dirty.set()  # with --fsync always, the syncer makes the unlinks durable

    async def _final_sync(self) -> None:
        """Shutdown: everything appended is made durable (in a worker thread), then files close.
        Shielded; bounded by ``shutdown_timeout`` so a hung disk cannot hang the exit (the
        files are then left to the OS, and recovery on the next start checks them).  It never waits
        for a READ sending from the partitions' own fds (lent): Registry closes them once it is back."""
        if self.failed is not None:
            self._fail_all(self.failed)
            self.close_files()
            return
        with trio.move_on_after(self.config.shutdown_timeout) as scope:
            try:
                for _ in range(2):  # the second round makes durable what the removal unlinked
                    job = self.log.sync_job(final=True)
                    if job is not None:
                        await run_blocking(job.run, abandon_on_cancel=True)
                        self.log.check_linked(job)
                    self._ack_upto(self.log.head)
                    await self._remove()
            except (OSError, StorageError) as e:
                log.critical("topic %s: final fsync failed: %s", self.name, e)
                self._fail_all(StorageError("final fsync failed"))
                self.close_files()
                return
        if scope.cancelled_caught:
            log.critical("topic %s: final fsync still running after %gs: exiting without it", self.name,
                         self.config.shutdown_timeout)
            self._fail_all(StorageError("shutdown"))
            return
        self.close_files()  # everything is synced: closing needs no fsync
