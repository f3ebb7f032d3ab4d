"""Reads of what an earlier process wrote: verification before serving, index rebuilds, the scrub.

A restart trusts each partition's index instead of rescanning it, so a frame
an earlier process left is checked (CRC + framing + its index record) before
it is first served, and the background scrub checks the rest at
``--scrub-rate``.  When the log and its index disagree, or an index file was
damaged under the server, the index is rebuilt from the log in a worker
thread: the ``.log`` is the truth, and only damage in it is corruption.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import trio

from logd_trio.core.errors import StorageError
from logd_trio.server.blocking import run_blocking
from logd_trio.server.cutgate import CutGate
from logd_trio.server.storage.reads import ReadPlan
from logd_trio.server.storage.rebuild import IndexSuspect
from logd_trio.server.storage.topic_log import TopicLog
from logd_trio.server.storage.verify import VerifyJob

__all__ = ["Verifier"]

log = logging.getLogger("logd_trio.server.topic")

# Background scrub: bytes verified per worker-thread call (paced to --scrub-rate).
SCRUB_CHUNK = 4 * 1024 * 1024


class Verifier:
    """The verification side of one topic (runs on the topic's Trio thread, blocking work in threads)."""

    def __init__(self, name: str, tlog: TopicLog, scrub_rate: int) -> None:
        self.name = name
        self.log = tlog
        self.scrub_rate = scrub_rate
        self._rebuilding = trio.Lock()
        self.cuts = CutGate()  # the scrub (and a follower's reads) never run during a cut of the log
        self.on_verified: Callable[[], None] = lambda: None  # --workers: frames trusted from a lower offset
        self.rebuilds = 0  # indexes swapped for a rebuilt file (--workers: a new generation of the files)

    async def check(self, plan: ReadPlan) -> None:
        """Verify ``plan.checks`` (closes ``plan``).  Raises :class:`IndexSuspect` when a batch
        disagrees with its index, :class:`StorageError` when the log cannot be read."""
        try:
            job = self.log.verify_job(plan.checks)
        finally:
            plan.close()
        # Always in a worker thread: the job preads the log, which blocks on a cold page cache
        # (the hop costs about 0.1 ms, once per range per process).
        await self._run(job)

    async def _run(self, job: VerifyJob) -> None:
        try:
            await run_blocking(job.run)
        except OSError as e:
            raise StorageError(f"topic {self.name}: cannot read for verification: {e.strerror}") from e
        finally:
            job.close()
        self.log.apply_verification(job)
        self.on_verified()

    async def rebuild(self, suspect: IndexSuspect) -> None:
        """Rebuild the index ``suspect`` names from its log (once, however many readers ask)."""
        async with self._rebuilding:
            job = self.log.rebuild_job(suspect.start, suspect.generation)
            if job is None:
                return  # gone, or rebuilt while this reader waited
            try:
                await run_blocking(job.run)  # not abandoned: the swap below always follows
            except OSError as e:
                raise StorageError(f"topic {self.name}: cannot rebuild an index: {e.strerror}") from e
            finally:
                self.log.apply_rebuild(job)  # (a failed job only unfreezes the old index)
                self.rebuilds += 1
                self.on_verified()

    async def _scrub_step(self) -> VerifyJob | None:
        job = self.log.scrub_job(SCRUB_CHUNK)
        if job is not None:
            await self._run(job)
        return job

    async def scrub(self) -> None:
        """Verify, at ``scrub_rate`` bytes/s, the frames an earlier process left and the index vouched for."""
        rate = self.scrub_rate
        total = self.log.unverified_bytes
        if rate <= 0 or not total:
            return
        log.info("topic %s: verifying %d bytes written before this start (scrub at %d bytes/s)",
                 self.name, total, rate)
        t0 = trio.current_time()
        try:
            while True:
                try:
                    job = await self.cuts.use(self._scrub_step)
                    if job is None:
                        break
                except IndexSuspect as e:
                    await self.cuts.use(functools.partial(self.rebuild, e))
                    continue
                if not job.checked:  # the index could not place the range: leave it to the reads
                    log.warning("topic %s: scrub stopped: cannot locate unverified frames", self.name)
                    return
                await trio.sleep(job.nbytes / rate)
        except (StorageError, OSError) as e:
            log.error("topic %s: scrub stopped: %s (reads still verify what they touch)", self.name, e)
            return
        log.info("topic %s: scrub done: %d bytes verified in %.1fs", self.name, total, trio.current_time() - t0)
