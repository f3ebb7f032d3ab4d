"""Consumer checkpoints (state handlers): where a scanner resumes.

A position is the pair (batch offset, delta) of the *next message to
deliver*.  A scanner commits the position after the messages the consumer
has finished with (see :mod:`logd_trio.client.scanner`), so the guarantee is
at-least-once: after a crash the consumer resumes at the last committed
position and may see messages after it again, but never skips one.

Any object with the two coroutines of :class:`Checkpoint` works (a database
row, a key in Redis...); :class:`FileCheckpoint` and :class:`MemoryCheckpoint`
are built in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import anyio

from logd_trio.core.errors import CheckpointError

__all__ = ["Checkpoint", "FileCheckpoint", "MemoryCheckpoint", "Position"]


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A message position: the offset of its batch and its delta inside the batch body."""

    offset: int
    delta: int = 0


@runtime_checkable
class Checkpoint(Protocol):
    """Load and commit a consumer's position for a topic."""

    async def load(self, topic: str) -> Position | None:
        """The committed position, or ``None`` when nothing was committed yet."""
        ...

    async def commit(self, topic: str, position: Position) -> None:
        """Durably record ``position`` (the next message to deliver)."""
        ...


class MemoryCheckpoint:
    """Keeps positions in a dict (tests, or a consumer that persists them itself)."""

    def __init__(self) -> None:
        self.positions: dict[str, Position] = {}
        self.commits = 0

    async def load(self, topic: str) -> Position | None:
        await anyio.lowlevel.checkpoint()
        return self.positions.get(topic)

    async def commit(self, topic: str, position: Position) -> None:
        await anyio.lowlevel.checkpoint()
        self.positions[topic] = position
        self.commits += 1


class FileCheckpoint:
    """One topic's position in a small JSON file, replaced atomically.

    A commit writes a temporary file beside the target, fsyncs it, renames it
    over the target and fsyncs the directory, so a crash leaves either the
    old or the new position, never a torn file.  Blocking file calls run in a
    worker thread.  Loading a file written for another topic raises
    :class:`~logd_trio.core.errors.CheckpointError`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    async def load(self, topic: str) -> Position | None:
        return await anyio.to_thread.run_sync(self._load, topic)

    async def commit(self, topic: str, position: Position) -> None:
        await anyio.to_thread.run_sync(self._commit, topic, position)

    def _load(self, topic: str) -> Position | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {self.path}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(raw)
            stored, offset, delta = data["topic"], data["offset"], data["delta"]
            if not (isinstance(stored, str) and isinstance(offset, int) and isinstance(delta, int)):
                raise TypeError
            if offset < 0 or delta < 0:
                raise ValueError
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {self.path} is not a valid checkpoint file") from exc
        if stored != topic:
            raise CheckpointError(f"checkpoint {self.path} belongs to topic {stored!r}, not {topic!r}")
        return Position(offset, delta)

    def _commit(self, topic: str, position: Position) -> None:
        data = json.dumps({"topic": topic, "offset": position.offset, "delta": position.delta}).encode()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write checkpoint {self.path}: {exc.strerror or exc}") from exc
