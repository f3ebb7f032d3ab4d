"""File-system helpers of the storage layer: names, directories, durable creation and removal.

Synchronous, no trio.  Layout (Go compatible): ``<root>/<topic>/<start>.log``
holds raw batch frames, named by the logical offset of its first byte;
logd-trio's ``<start>.index`` sits beside it; Go's ``<start>.idx`` files are
left alone; ``<start>.log.corrupt-<pos>-<time>`` are copies of damaged bytes.
A deleted topic's directory is first renamed ``~deleted~<topic>~<ns>`` (not a
topic name, so no start serves it), then emptied and removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from logd_trio.core.framing import valid_topic
from logd_trio.server.storage.syscalls import current

__all__ = [
    "CORRUPT_MARK", "DELETED_PREFIX", "GO_INDEX_SUFFIX", "INDEX_SUFFIX", "LOG_SUFFIX", "O_CLOEXEC", "SCAN_CHUNK",
    "close_quietly", "copy_aside", "fsync_dir", "index_path", "list_topics", "log_path", "make_root",
    "open_dir", "open_topic_dir", "parse_start", "remove_deleted", "remove_files", "remove_topic", "write_all",
]

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
GO_INDEX_SUFFIX = ".idx"
CORRUPT_MARK = ".log.corrupt-"
DELETED_PREFIX = "~deleted~"  # "~" is not allowed in topic names
# Largest single read of a scan or copy.
SCAN_CHUNK = 1 << 20
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def log_path(directory: Path, start: int) -> Path:
    return directory / f"{start}{LOG_SUFFIX}"


def index_path(directory: Path, start: int) -> Path:
    return directory / f"{start}{INDEX_SUFFIX}"


def parse_start(name: str, suffix: str) -> int | None:
    """The start offset in ``<digits><suffix>`` (canonical decimal only), else None."""
    if not name.endswith(suffix):
        return None
    stem = name[: -len(suffix)]
    if not stem or not stem.isascii() or not stem.isdigit() or str(int(stem)) != stem:
        return None
    return int(stem)


def open_dir(path: Path) -> int:
    """A read-only fd of directory ``path`` (for fsync and fstat)."""
    return os.open(path, os.O_RDONLY | _O_DIRECTORY | O_CLOEXEC)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = open_dir(path)
    try:
        current().fsync(fd)
    finally:
        os.close(fd)


def open_topic_dir(root: Path, topic: str, dir_mode: int) -> int:
    """Create ``root/topic`` if missing (each new entry's parent fsynced); return an fd of it."""
    if not root.exists():
        os.makedirs(root, mode=dir_mode, exist_ok=True)
        fsync_dir(root.parent)
    try:
        os.mkdir(root / topic, dir_mode)
        fsync_dir(root)
    except FileExistsError:
        pass
    return open_dir(root / topic)


def write_all(fd: int, data: bytes | memoryview, n: int, pos: int) -> None:
    """Write the ``n`` bytes of ``data`` at ``pos`` (one pwrite unless it comes up short)."""
    pwrite = current().pwrite
    w = pwrite(fd, data, pos)
    if w == n:
        return
    view = memoryview(data).cast("B")
    while w < n:
        if w <= 0:
            raise OSError(errno.EIO, "write made no progress")
        pos += w
        view = view[w:]
        n -= w
        w = pwrite(fd, view, pos)


def close_quietly(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def remove_files(paths: Iterable[Path], log: logging.Logger, topic: str) -> None:
    """Unlink ``paths`` in order; a missing one is fine, another failure is logged (not raised)."""
    for path in paths:
        try:
            current().unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("topic %s: cannot remove %s: %s", topic, path, e)


def _purge(directory: Path, log: logging.Logger, topic: str) -> int:
    """Unlink every file in ``directory`` (partitions oldest first), then the directory; bytes freed."""
    files: list[tuple[int, str]] = []
    freed = 0
    for name in os.listdir(directory):
        try:
            st = os.lstat(directory / name)
        except FileNotFoundError:
            continue
        if os.path.isdir(directory / name) and not os.path.islink(directory / name):
            log.warning("topic %s: %s is a directory, left in place", topic, directory / name)
            continue
        freed += st.st_size
        stem = name.split(".", 1)[0]
        files.append((int(stem) if stem.isascii() and stem.isdigit() else -1, name))
    remove_files((directory / name for _, name in sorted(files)), log, topic)
    try:
        os.rmdir(directory)
    except OSError as e:
        log.warning("topic %s: cannot remove %s: %s", topic, directory, e)
    return freed


def remove_topic(root: Path, topic: str, log: logging.Logger) -> int:
    """Blocking: remove ``root/topic`` (its files closed) and return the bytes freed.

    The directory is renamed aside and the rename made durable first, so a crash
    part-way leaves either the whole topic or nothing a start would serve (a start
    finishes the removal: :func:`remove_deleted`)."""
    aside = Path(root) / f"{DELETED_PREFIX}{topic}~{time.time_ns()}"
    os.rename(Path(root) / topic, aside)
    fsync_dir(Path(root))
    freed = _purge(aside, log, topic)
    fsync_dir(Path(root))
    return freed


def remove_deleted(root: Path, log: logging.Logger) -> list[str]:
    """Blocking: finish removals a crash interrupted (directories renamed by :func:`remove_topic`)."""
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith(DELETED_PREFIX))
    except FileNotFoundError:
        return []
    for name in names:
        topic = name[len(DELETED_PREFIX):].rpartition("~")[0] or name
        log.info("topic %s: finishing its deletion (%s)", topic, name)
        _purge(Path(root) / name, log, topic)
    if names:
        fsync_dir(Path(root))
    return names


def make_root(root: Path, dir_mode: int = 0o700) -> None:
    """Create the data directory (and missing parents) durably: each new entry's parent is fsynced."""
    root = Path(root)
    if root.is_dir():
        return
    make_root(root.parent, dir_mode)
    try:
        os.mkdir(root, dir_mode)
    except FileExistsError:
        return
    fsync_dir(root.parent)


def list_topics(root: Path) -> list[str]:
    """Names of the topic directories under ``root`` (valid topic names only), sorted."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(
        n for n in names if valid_topic(n.encode("utf-8", "surrogateescape")) and (root / n).is_dir()
    )


def copy_aside(directory: Path, start: int, fd: int, a: int, b: int, file_mode: int, *,
               reuse: bool = False) -> Path:
    """Copy bytes ``[a, b)`` of partition ``<start>.log`` (open as ``fd``) to
    ``<start>.log.corrupt-<a>-<unixtime>`` beside it, fsynced with its directory
    entry, in chunks.  With ``reuse``, an existing copy of the same range (made
    by an earlier run) is returned instead of copying again."""
    prefix = f"{start}{CORRUPT_MARK}{a}-"
    sys = current()
    if reuse:
        for name in os.listdir(directory):
            if name.startswith(prefix) and (directory / name).stat().st_size == b - a:
                return directory / name
    stamp = int(time.time())
    copy = directory / f"{prefix}{stamp}"
    suffix = 0
    while True:
        try:
            cfd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, file_mode)
            break
        except FileExistsError:
            suffix += 1
            copy = directory / f"{prefix}{stamp}.{suffix}"
    try:
        at = a
        while at < b:  # in chunks: a large damaged range is never read into memory at once
            chunk = os.pread(fd, min(SCAN_CHUNK, b - at), at)
            if not chunk:
                raise OSError(errno.EIO, f"partition {start} shrank while copying")
            view = memoryview(chunk)
            while view:
                view = view[sys.write(cfd, view) :]
            at += len(chunk)
        sys.fsync(cfd)
    finally:
        os.close(cfd)
    fsync_dir(directory)
    return copy
