"""Read planning: which byte ranges of which partitions answer one READ.

Synchronous, no trio.  A :class:`ReadPlan` owns dup'ed fds of the partitions
it covers, so it stays valid while retention drops them; the server streams
its segments with ``sendfile``.  A *borrowed* plan (``borrow=True``) uses the
partitions' own fds, valid only until the caller next yields to other tasks: a
server that sends it at once pays no ``dup``/``close`` and calls
:meth:`ReadPlan.own` before its first wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

from logd_trio.core.errors import NotFound, StorageError
from logd_trio.server.storage.files import close_quietly
from logd_trio.server.storage.index import IndexDamaged
from logd_trio.server.storage.partition import Partition
from logd_trio.server.storage.rebuild import IndexSuspect, frame_at
from logd_trio.server.storage.syscalls import current

__all__ = ["CorruptData", "ReadPlan", "plan_read"]


class CorruptData(StorageError):
    """A stored batch failed its CRC or framing check; it is never served (``ERR corrupt data``)."""


class ReadPlan:
    """Batches to send for one READ: ``segments`` are ``(fd, position, length)`` on dup'ed fds.

    ``checks`` lists ``(partition start, position, end)`` ranges of the plan
    that were not verified (CRC + framing) since this process opened them: a
    server must not send such a plan (see ``docs/durability.md``); the topic's
    ``open_read`` verifies them and plans again.
    """

    __slots__ = ("_closed", "borrowed", "checks", "nbatches", "nbytes", "nmessages", "offset", "on_close",
                 "segments")

    def __init__(self, offset: int, borrowed: bool = False) -> None:
        self.offset = offset
        self.nbatches = 0
        self.nmessages = 0
        self.nbytes = 0
        self.segments: list[tuple[int, int, int]] = []
        self.checks: list[tuple[int, int, int]] = []
        self._closed = False
        self.borrowed = borrowed  # segments hold the partitions' own fds (see own())
        self.on_close: Callable[[ReadPlan], None] | None = None  # called once, after the fds are closed

    def own(self) -> None:
        """Make a borrowed plan hold fds of its own (``dup``), so it outlives the partitions;
        call it before waiting.  A no-op for an owned plan.  Raises OSError (e.g. EMFILE)."""
        if self.borrowed and not self._closed:
            dup = current().dup
            owned: list[tuple[int, int, int]] = []
            try:
                for fd, pos, length in self.segments:
                    owned.append((dup(fd), pos, length))
            except BaseException:
                close_quietly([fd for fd, _, _ in owned])
                raise
            self.segments = owned
            self.borrowed = False

    def close(self) -> None:
        """Close the dup'ed fds (a borrowed plan's are the partitions': left open).  Idempotent."""
        if not self._closed:
            self._closed = True
            if not self.borrowed:
                close_quietly([fd for fd, _, _ in self.segments])
            if self.on_close is not None:
                self.on_close(self)

    def __enter__(self) -> ReadPlan:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def plan_read(parts: Sequence[Partition], j: int, offset: int, limit: int, stop: int, topic: str,
              max_partitions: int | None = None, borrow: bool = False) -> ReadPlan:
    """Plan (``borrow``: a borrowed plan, see :meth:`ReadPlan.own`) from ``offset`` (a retained
    offset before ``stop``, in ``parts[j]``) while the message
    sum is below ``limit``, never past ``stop``, never over a batch that failed verification,
    and over at most ``max_partitions`` partitions (each holds a dup'ed fd; at least one).

    Raises :class:`NotFound` if ``offset`` does not start a batch, :class:`CorruptData` if that
    batch failed verification, :class:`StorageError` on an I/O error.
    """
    p = parts[j]
    try:
        i = p.idx.find_start(offset - p.start)
    except IndexDamaged as e:
        raise IndexSuspect(p.start, p.generation, str(e)) from e
    if i < 0:
        pos = offset - p.start
        if p.bad.first_overlap(pos, pos + 1) is not None:
            raise CorruptData(f"topic {topic}: batch at offset {offset} is corrupt")
        if pos < p.vend and p.verified.missing(pos, pos + 1) and frame_at(p.fd, pos, p.size)[0]:
            # a valid batch the (not yet verified) index does not know: the index is wrong
            raise IndexSuspect(p.start, p.generation, f"no record for the batch at position {pos}")
        raise NotFound(f"offset {offset} is not the start of a batch")
    plan = ReadPlan(offset, borrow)
    remaining = max(limit, 1)
    dup = _same if borrow else current().dup
    try:
        while True:
            b_end, base = p.idx.entry(i - 1)
            k = p.idx.first_reaching(i, base + remaining)
            if k >= len(p.idx):
                k = len(p.idx) - 1
            e_end, e_cum = p.idx.entry(k)
            if p.start + e_end > stop:
                # Largest batch in [i, k] that ends at or before ``stop``.
                k = max(i, p.idx.last_end_at_most(stop - p.start))
                e_end, e_cum = p.idx.entry(k)
                remaining = 0  # nothing visible beyond this batch
            if p.bad:
                hit = p.bad.first_overlap(b_end, e_end)
                if hit is not None:  # a batch that failed verification: stop before it
                    if hit[0] <= b_end:
                        if plan.segments:
                            break
                        raise CorruptData(f"topic {topic}: batch at offset {offset} is corrupt")
                    k = p.idx.last_end_at_most(hit[0])
                    e_end, e_cum = p.idx.entry(k)
                    remaining = 0
            if b_end < p.vend:  # written by an earlier process and not verified yet
                for a, b in p.verified.missing(b_end, min(e_end, p.vend)):
                    plan.checks.append((p.start, a, b))
            if not b_end < e_end <= p.size or e_cum <= base:  # a record the log contradicts
                raise IndexSuspect(p.start, p.generation, f"record {k} is out of bounds")
            p.idx.hint(e_end, k + 1)
            plan.segments.append((dup(p.fd), b_end, e_end - b_end))
            plan.nbatches += k - i + 1
            plan.nmessages += e_cum - base
            plan.nbytes += e_end - b_end
            remaining -= e_cum - base
            j += 1
            if remaining <= 0 or j >= len(parts) or len(plan.segments) >= (max_partitions or len(parts)):
                break
            nxt = parts[j]
            if nxt.start >= stop:
                break
            if nxt.start != p.end or nxt.size == 0:
                break  # a gap left by recovery: stop here
            p, i = nxt, 0
    except IndexDamaged as e:
        plan.close()
        raise IndexSuspect(p.start, p.generation, str(e)) from e
    except OSError as e:
        plan.close()
        raise StorageError(f"topic {topic}: cannot plan read: {e.strerror or type(e).__name__}") from e
    except BaseException:
        plan.close()
        raise
    return plan


def _same(fd: int) -> int:
    return fd
