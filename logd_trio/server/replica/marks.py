"""What a node keeps in its data directory for replication besides the topics.

- ``leader-epoch``: the newest leader epoch this node served or saw (a number).
- ``history-id``: which history the data directory holds.  A leader makes
  one up when its directory has none (a new or emptied directory); a
  follower keeps its leader's, so a follower's directory can replace the
  leader's.  A follower whose leader answers with another id is looking at a
  different history (e.g. the leader restarted with an empty directory) and
  copies nothing from it.
- ``high-watermark``: per topic, the newest high watermark this node knew
  (``<topic> <offset>`` lines).  Written by :meth:`Watermarks.run` at most
  every :data:`CHECKPOINT_INTERVAL` seconds when a mark moved (one worker
  thread write for any number of batches), so that a node restarted after a
  crash caps its readers where they were rather than at its log's end.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from pathlib import Path
from typing import Final

import trio

from logd_trio.core.errors import StorageError
from logd_trio.core.framing import valid_topic
from logd_trio.server.blocking import run_blocking
from logd_trio.server.storage.files import O_CLOEXEC, fsync_dir, write_all
from logd_trio.server.storage.syscalls import current

__all__ = ["CHECKPOINT_INTERVAL", "EPOCH_COUNTER", "HISTORY_FILE", "HW_FILE", "Watermarks", "read_counter",
           "read_history", "write_counter", "write_history"]

log = logging.getLogger("logd_trio.server.replica")

EPOCH_COUNTER: Final = "leader-epoch"
HISTORY_FILE: Final = "history-id"
HW_FILE: Final = "high-watermark"
CHECKPOINT_INTERVAL: Final = 0.2  # seconds between checkpoints of moved high watermarks (at most)
RETRY_FIRST: Final = 1.0  # seconds before the first retry of a failed checkpoint, doubled per failure
RETRY_MAX: Final = 30.0  # ... up to this
FAILURE_LOG_EVERY: Final = 60.0  # seconds between log lines while checkpoints keep failing


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Blocking: replace ``path`` with ``data`` durably (temporary file, fsync, rename, directory fsync)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, mode)
        try:
            write_all(fd, data, len(data), 0)  # a short write (ENOSPC) raises: the old file stays
            current().fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise StorageError(f"cannot read {path}: {e}") from e


def read_counter(path: Path) -> int:
    text = (_read_text(path) or "0").strip()
    if not text.isdigit():
        raise StorageError(f"{path}: expected a number, got {text[:40]!r}")
    return int(text)


def write_counter(path: Path, value: int, mode: int) -> None:
    _write_file(path, b"%d\n" % value, mode)


def read_history(workdir: Path) -> str:
    """The data directory's history id ("" if it has none)."""
    text = (_read_text(workdir / HISTORY_FILE) or "").strip()
    if text and not (len(text) <= 64 and text.isalnum()):
        raise StorageError(f"{workdir / HISTORY_FILE}: expected a short id, got {text[:40]!r}")
    return text


def write_history(workdir: Path, history: str, mode: int) -> None:
    _write_file(workdir / HISTORY_FILE, history.encode("ascii") + b"\n", mode)


def new_history() -> str:
    return secrets.token_hex(8)


def _parse_marks(path: Path, text: str) -> dict[str, int]:
    marks: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if len(words) != 2 or not valid_topic(words[0].encode()) or not words[1].isdigit():
            raise StorageError(f"{path}:{n}: expected '<topic> <offset>', got {line[:60]!r}")
        marks[words[0]] = int(words[1])
    return marks


class Watermarks:
    """Each topic's high watermark as this node knows it: it only moves forward (a batch once
    readable stays readable) unless the log is cut below it; checkpointed by :meth:`run`."""

    def __init__(self, workdir: Path, file_mode: int) -> None:
        self.path = workdir / HW_FILE
        self.file_mode = file_mode
        self.marks: dict[str, int] = {}
        self._saved: dict[str, int] = {}
        self._dirty = trio.Event()
        self.checkpoints = 0  # written since start
        self.failures = 0  # failed checkpoints in a row (retried with backoff)
        self._logged_at = -math.inf  # when a failure was last logged

    def load(self) -> None:
        """Blocking: the last checkpoint (none: every mark at 0)."""
        text = _read_text(self.path)
        self.marks = _parse_marks(self.path, text) if text else {}
        self._saved = dict(self.marks)

    def get(self, topic: str) -> int:
        return self.marks.get(topic, 0)

    def raise_to(self, topic: str, offset: int) -> bool:
        """Move ``topic``'s mark up to ``offset``; True if it moved."""
        if offset <= self.marks.get(topic, 0):
            return False
        self.marks[topic] = offset
        self._dirty.set()
        return True

    def cut(self, topic: str, end: int, *, wake: bool = True) -> None:
        """The log now ends at ``end``: a mark beyond it comes down (a recreated or cut topic).
        ``wake=False`` in a worker thread (a topic being opened): no Trio object is touched there; the
        next checkpoint writes it, and until then every open of the topic cuts its mark again."""
        if self.marks.get(topic, 0) > end:
            self.marks[topic] = end
            if wake:
                self._dirty.set()

    def forget(self, topic: str) -> None:
        if self.marks.pop(topic, None) is not None:
            self._dirty.set()

    def save(self, marks: dict[str, int]) -> None:
        """Blocking: write ``marks`` as the checkpoint."""
        _write_file(self.path, "".join(f"{t} {o}\n" for t, o in sorted(marks.items())).encode(), self.file_mode)

    async def run(self) -> None:
        """Checkpoint moved marks until cancelled (then once more, shielded, if one moved)."""
        try:
            while True:
                await self._dirty.wait()
                await trio.sleep(CHECKPOINT_INTERVAL)  # one write for every move meanwhile
                await self._flush()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._flush()

    async def _flush(self) -> None:
        self._dirty = trio.Event()
        if self.marks == self._saved:
            return
        snapshot = dict(self.marks)
        try:
            await run_blocking(self.save, snapshot)
        except StorageError as e:
            self.failures += 1
            now = trio.current_time()
            if self.failures == 1 or now - self._logged_at >= FAILURE_LOG_EVERY:
                self._logged_at = now
                again = f" ({self.failures} failures in a row)" if self.failures > 1 else ""
                log.error("high-watermark checkpoint: %s%s; retried with backoff", e, again)
            self._dirty.set()
            await trio.sleep(min(RETRY_MAX, RETRY_FIRST * 2 ** (self.failures - 1)))
            return
        if self.failures:
            log.warning("high-watermark checkpoint written again after %d failures", self.failures)
            self.failures = 0
        self._saved = snapshot
        self.checkpoints += 1
