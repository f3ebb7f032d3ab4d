"""The head table: each topic's published (acknowledged) head, in a small shared file.

The owning process is the only writer; worker processes map the same file
read-only.  One fixed-size slot per topic, guarded by a *seqlock*: the writer
makes the slot's sequence number odd, writes the fields, then makes it even
again; a reader copies the fields between two reads of the sequence number and
retries while it was odd or changed.  One writer (the owner's Trio thread), so
the writer needs no lock.  The accesses are plain loads and stores to the
shared mapping, with no barrier: correct only where the CPU keeps stores in
order and loads in order (x86-64), so ``--workers`` above 1 is refused on
other machines (``config._check_workers``); no reader ever writes.

A header count of slot assignments (bumped after the slot is written) lets a
worker remember that a topic has no slot without scanning again per read.

Slot layout (little-endian)::

    0   seq     u64   odd while the owner writes the slot
    8   gen     u64   the topic's partition-list generation (0: slot free)
    16  head    u64   visible head: every batch before it is acknowledged
    24  first   u64   the oldest retained offset
    32  base    u64   batches before it were written by an earlier process
    40  namelen u32
    44  -       u32
    48  name    bytes[256]

Pure file code: no trio.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["SLOT_SIZE", "HeadTable", "HeadWriter", "Published"]

MAGIC: Final = b"LOGDHEAD"
_HEADER: Final = struct.Struct("<8sI")  # magic, slots
_CHANGES: Final = struct.Struct("<Q")  # at offset 16: bumped when a slot is assigned or freed
_CHANGES_AT: Final = 16
HEADER_SIZE: Final = 64
SLOT_SIZE: Final = 320
NAME_MAX: Final = 256
_SEQ: Final = struct.Struct("<Q")
_FIELDS: Final = struct.Struct("<QQQQI")  # gen, head, first, base, namelen (at offset 8)
_RETRIES: Final = 1000
_MISS: Final = object()  # a stable slot of another topic (or free)


@dataclass(frozen=True, slots=True)
class Published:
    """One slot as a worker read it."""

    gen: int
    head: int
    first: int
    base: int


def _slot_at(i: int) -> int:
    return HEADER_SIZE + i * SLOT_SIZE


class HeadWriter:
    """The owner's side: creates the file, assigns slots to topics, publishes."""

    def __init__(self, path: Path, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.path = path
        self.slots = slots
        size = HEADER_SIZE + slots * SLOT_SIZE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        _HEADER.pack_into(self._mm, 0, MAGIC, slots)
        self._changes = 0
        self._index: dict[str, int] = {}
        self._free = list(range(slots - 1, -1, -1))  # popped from the end: slot 0 first

    def __contains__(self, topic: str) -> bool:
        return topic in self._index

    def publish(self, topic: str, gen: int, head: int, first: int, base: int) -> bool:
        """Write the topic's slot (assigned on first use); False when every slot is taken or the
        name does not fit (the topic is then unknown to workers: they relay its reads)."""
        if gen < 1:
            raise ValueError("gen must be at least 1")
        i = self._index.get(topic)
        name = topic.encode("utf-8", "surrogateescape")
        if i is None:
            if not self._free or len(name) > NAME_MAX:
                return False
            i = self._index[topic] = self._free.pop()
            new = True
        else:
            new = False
        at = _slot_at(i)
        mm = self._mm
        seq = _SEQ.unpack_from(mm, at)[0]
        _SEQ.pack_into(mm, at, seq + 1)  # odd: being written
        _FIELDS.pack_into(mm, at + 8, gen, head, first, base, len(name))
        mm[at + 48:at + 48 + len(name)] = name
        _SEQ.pack_into(mm, at, seq + 2)
        if new:  # after the slot is whole: a worker that scans on this count finds it
            self._changed()
        return True

    def forget(self, topic: str) -> None:
        """The topic is gone (DELETE): its slot reads as free from now on."""
        i = self._index.pop(topic, None)
        if i is None:
            return
        at = _slot_at(i)
        mm = self._mm
        seq = _SEQ.unpack_from(mm, at)[0]
        _SEQ.pack_into(mm, at, seq + 1)
        _FIELDS.pack_into(mm, at + 8, 0, 0, 0, 0, 0)
        _SEQ.pack_into(mm, at, seq + 2)
        self._free.append(i)
        self._changed()

    def _changed(self) -> None:
        self._changes += 1
        _CHANGES.pack_into(self._mm, _CHANGES_AT, self._changes)

    def close(self) -> None:
        self._mm.close()


class HeadTable:
    """A worker's side: reads slots (never writes)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ValueError(f"{path}: not a head table")
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, slots = _HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC or size < HEADER_SIZE + slots * SLOT_SIZE:
            self._mm.close()
            raise ValueError(f"{path}: not a head table")
        self.slots: int = slots
        self._where: dict[str, int] = {}  # topic -> slot last found in (checked on every read)
        self._missing: dict[str, int] = {}  # topic -> the change count when a scan did not find it
        self.unstable = False  # the last read returned None for a slot never stable (not: no slot)

    def read(self, topic: str) -> Published | None:
        """The topic's published state, or None if the owner publishes none for it (unknown,
        deleted, or a slot never stable within the retries: the caller relays)."""
        name = topic.encode("utf-8", "surrogateescape")
        self.unstable = False
        i = self._where.get(topic)
        if i is not None:
            got = self._read_slot(i, name)
            if isinstance(got, Published):
                return got
            if got is None:  # being written for too long: relay this once, keep the slot
                self.unstable = True
                return None
            del self._where[topic]
        changes = _CHANGES.unpack_from(self._mm, _CHANGES_AT)[0]
        if self._missing.get(topic) == changes:  # no slot assigned since the last scan missed it
            return None
        unstable = False
        for i in range(self.slots):  # a topic new to this worker (or moved): scan once
            got = self._read_slot(i, name)
            if isinstance(got, Published):
                self._where[topic] = i
                self._missing.pop(topic, None)
                return got
            unstable = unstable or got is None
        self.unstable = unstable
        if not unstable:  # (a slot being written may be this topic's: scan again next time)
            if len(self._missing) >= 4096:
                self._missing.clear()
            self._missing[topic] = changes
        return None

    def _read_slot(self, i: int, name: bytes) -> Published | object | None:
        """The slot's state if it is ``name``'s; _MISS if it is not; None if never stable."""
        at = _slot_at(i)
        mm = self._mm
        for _ in range(_RETRIES):
            seq = _SEQ.unpack_from(mm, at)[0]
            if seq & 1:
                continue
            gen, head, first, base, n = _FIELDS.unpack_from(mm, at + 8)
            same = n == len(name) and mm[at + 48:at + 48 + n] == name
            if _SEQ.unpack_from(mm, at)[0] != seq:
                continue
            if not gen or not same:
                return _MISS
            return Published(gen, head, first, base)
        return None

    def close(self) -> None:
        self._mm.close()
