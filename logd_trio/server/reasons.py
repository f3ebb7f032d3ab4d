"""The one step between a server-side error and the reason text a client may see:
:func:`error_reply` is the one place a request's error becomes ``ERR`` text.

Log lines carry full paths (the operator needs them); replies must not: a client
learns nothing useful from ``/srv/logd/data/t/1200.log`` and an attacker learns
the layout of the host.  :func:`public_reason` keeps the message and cuts every
path in it to its last component (``1200.log``).
"""

from __future__ import annotations

import os
import re
from typing import Final

from logd_trio.core import requests as p
from logd_trio.core.errors import LogdError, NotFound, RequestError, StorageError
from logd_trio.server.storage.reads import CorruptData

__all__ = ["TopicDeleted", "error_kind", "error_reply", "public_reason", "strip_paths"]

# An absolute path of two or more components, not inside a word ("I/O" stays).
_ABSOLUTE: Final = re.compile(r"(?<![\w.~-])/(?:[^\s'\":/]+/)+([^\s'\":/]+)")


class TopicDeleted(StorageError):
    """The topic was deleted (``DELETE``) while a request waited for it: ``ERR topic deleted``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"topic {name} was deleted")


def _names(exc: BaseException) -> list[str]:
    """The file names of the OSErrors in ``exc``'s chain of causes."""
    names: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            for name in (e.filename, e.filename2):
                if isinstance(name, str | bytes | os.PathLike):
                    names.append(os.fsdecode(name))
        e = e.__cause__ or e.__context__
    return names


def strip_paths(text: str, names: list[str] | None = None) -> str:
    """``text`` with each of ``names`` and every absolute path cut to its last component."""
    for name in sorted(names or (), key=len, reverse=True):
        base = os.path.basename(name.rstrip("/")) or name
        if name != base:
            text = text.replace(name, base)
    return _ABSOLUTE.sub(lambda m: m.group(1), text)


def public_reason(exc: BaseException) -> str:
    """``str(exc)`` fit for an ``ERR`` reply: no directory names of the server."""
    return strip_paths(str(exc), _names(exc))


def error_reply(e: LogdError) -> bytes:
    """The ``ERR`` line for an error of a request: the one place errors become wire text."""
    if isinstance(e, RequestError):
        return p.reply_err(e.reason)
    if isinstance(e, NotFound):
        return b"ERR not found\r\n"
    if isinstance(e, CorruptData):  # never send a frame that fails its CRC
        return b"ERR corrupt data\r\n"
    if isinstance(e, TopicDeleted):  # a long-poll on a topic that DELETE removed
        return b"ERR topic deleted\r\n"
    if isinstance(e, StorageError):
        return p.reply_err(f"storage error: {public_reason(e)}")
    return p.reply_err(f"internal error: {type(e).__name__}")


def error_kind(e: LogdError) -> str:
    """The ``errors`` metric label of an error of a request."""
    if isinstance(e, RequestError):
        return "refused"
    if isinstance(e, NotFound | TopicDeleted):
        return "not_found"
    if isinstance(e, CorruptData):
        return "corrupt"
    return "storage"
