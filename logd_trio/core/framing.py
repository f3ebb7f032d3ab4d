"""Batch framing, CRC and message walking: pure functions, no I/O.

A stored *frame* is ``BATCH <size> <topic> <crc32> <n>\\r\\n`` followed by a
body of ``size`` bytes, itself a run of ``MSG <len>\\r\\n<len bytes>\\r\\n``.
"""

from __future__ import annotations

import functools
import importlib
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, cast

from logd_trio.core.errors import InvalidBatchError

__all__ = [
    "FrameHeader",
    "build_body",
    "build_frame",
    "check_frame",
    "count_messages",
    "crc32",
    "framed_size",
    "iter_messages",
    "msg_header",
    "parse_frame_header",
    "valid_topic",
]

_MAX_U64 = 2**64 - 1
_TOPIC_RE = re.compile(rb"[A-Za-z0-9._-]{1,255}")
# Longest possible MSG header: "MSG " + 20 digits + "\r\n".
_MSG_HEADER_MAX = 26


def _pick_crc32() -> Callable[[bytes | bytearray | memoryview], int]:
    """ISA-L's CRC-32 when the optional ``isal`` package is installed (``pip install
    logd-trio[fast]``: about 3x zlib's on 64 KB), else zlib's; the same values."""
    try:
        fast = importlib.import_module("isal.isal_zlib")
    except ImportError:
        return zlib.crc32
    return cast(Callable[[bytes | bytearray | memoryview], int], fast.crc32)


# CRC-32/IEEE as the protocol carries it (unsigned): ``crc32(data) -> int``.
crc32 = _pick_crc32()


def valid_topic(name: bytes) -> bool:
    """1..255 bytes of ``[A-Za-z0-9._-]``, and not ``.`` or ``..``."""
    return _TOPIC_RE.fullmatch(name) is not None and name not in (b".", b"..")


def parse_uint(word: bytes) -> int | None:
    """Parse an unsigned ASCII decimal that fits 64 bits; ``None`` otherwise."""
    if len(word) > 20:
        word = word.lstrip(b"0") or b"0"  # Go's ParseUint accepts leading zeros
    if not word or len(word) > 20 or not word.isdigit():
        return None
    value = int(word)
    return value if value <= _MAX_U64 else None


def count_messages(body: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> int:
    """Walk the MSG framing of ``body[start:end]`` and return the message count.

    Raises :class:`InvalidBatchError` unless the framing is exact: every message
    is ``MSG <len>\\r\\n<len bytes>\\r\\n`` and the last CRLF is the last byte.
    This is the one per-message loop on the server's hot path, so it uses only
    C-level searches per message.
    """
    if end is None:
        end = len(body)
    buf = body if isinstance(body, bytes) else bytes(body[start:end])
    if buf is not body:
        end -= start
        start = 0
    n = _count_uniform(buf, start, end) or _count_fast(buf, start, end)
    if n > 0:
        return n
    # The exact walk: only reached for invalid (or empty) bodies, to say what is wrong.
    n = 0
    for _ in iter_messages(buf, start, end):
        n += 1
    if n == 0:
        raise InvalidBatchError("empty batch")
    return n


def _count_uniform(buf: bytes, start: int, end: int) -> int:
    """Fast path: the count when every message has the first one's length, else 0.

    Equal-length messages make the body a run of ``n`` records of one stride;
    the framing is then exact iff every record starts with the first record's
    ``MSG <len>\\r\\n`` header and ends with CRLF.  That is checked with one
    strided slice per header byte (C loops over ``n`` bytes), joined and compared
    once with the expected columns, instead of a Python loop per message.
    """
    nl = buf.find(b"\r\n", start + 4, min(start + _MSG_HEADER_MAX, end))
    if nl < 0 or not buf.startswith(b"MSG ", start):
        return 0
    word = buf[start + 4 : nl]
    if not word.isdigit():
        return 0
    h = nl + 2 - start
    stride = h + int(word) + 2
    n, rem = divmod(end - start, stride)
    if rem or n < 2:
        return 0
    at = (*range(h), stride - 2, stride - 1)
    if (h + 2) * n <= _COLUMNS_CACHED:
        columns = [buf[start + j : end : stride] for j in at]
        return n if b"".join(columns) == _uniform_columns(buf[start : start + h], n) else 0
    for j, c in zip(at, buf[start : start + h] + b"\r\n", strict=True):  # a big body: nothing kept
        if buf[start + j : end : stride].count(c) != n:
            return 0
    return n


# The expected columns are kept for bodies whose columns take at most this many bytes (so the
# cache of 32 holds at most 2 MiB); a bigger body is counted column by column instead.
_COLUMNS_CACHED = 64 * 1024


@functools.lru_cache(maxsize=32)
def _uniform_columns(header: bytes, n: int) -> bytes:
    """What :func:`_count_uniform`'s columns joined are for ``n`` records of ``header``: each header
    byte ``n`` times, then CR and LF ``n`` times (one compare instead of a count per column)."""
    return b"".join(bytes([c]) * n for c in header + b"\r\n")


_MSG_HEADER = re.compile(rb"MSG ([0-9]{1,20})\r\n")


def _count_fast(buf: bytes, start: int, end: int) -> int:
    """The exact walk with one regex match per header; 0 when the framing is bad (or empty)."""
    pos = start
    n = 0
    match = _MSG_HEADER.match
    startswith = buf.startswith
    while pos < end:
        m = match(buf, pos, end)
        if m is None:
            return 0
        pos = m.end() + int(m[1])
        if not startswith(b"\r\n", pos, end):
            return 0
        pos += 2
        n += 1
    return n


def iter_messages(body: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(delta, message)`` for each message of the well-formed body ``body[start:end]``.

    ``delta`` is the byte position of the message's ``MSG`` line from ``start``.
    Raises :class:`InvalidBatchError` on bad framing.  The one exact MSG walk.
    """
    pos = start
    if end is None:
        end = len(body)
    startswith = body.startswith
    while pos < end:
        if not startswith(b"MSG ", pos):
            raise InvalidBatchError("expected MSG header")
        nl = body.find(b"\r\n", pos + 4, min(pos + _MSG_HEADER_MAX, end))
        if nl < 0:
            raise InvalidBatchError("MSG header without CRLF")
        word = body[pos + 4 : nl]
        if not word.isdigit():
            raise InvalidBatchError("MSG length is not a number")
        first = nl + 2
        stop = first + int(word)
        if stop + 2 > end or not startswith(b"\r\n", stop):
            raise InvalidBatchError("message not followed by CRLF")
        yield pos - start, body[first:stop]
        pos = stop + 2


def msg_header(length: int) -> bytes:
    """``MSG <length>\\r\\n``: what precedes a message of ``length`` bytes in a body."""
    return b"MSG %d\r\n" % length


def framed_size(length: int) -> int:
    """Bytes a message of ``length`` bytes takes in a body (header, message, CRLF)."""
    return len(b"MSG %d\r\n" % length) + length + 2


def build_body(messages: Iterable[bytes]) -> bytes:
    """Frame messages as a batch body."""
    parts: list[bytes] = []
    for m in messages:
        parts += (msg_header(len(m)), m, b"\r\n")
    return b"".join(parts)


def build_frame(topic: str | bytes, body: bytes, count: int) -> bytes:
    """A complete ``BATCH`` request / stored frame for ``body``."""
    t = topic.encode("ascii") if isinstance(topic, str) else topic
    return b"BATCH %d %s %d %d\r\n" % (len(body), t, crc32(body), count) + body


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The parsed first line of a stored frame."""

    size: int  # body size
    topic: bytes
    crc: int
    count: int
    header_len: int  # length of the BATCH line including CRLF

    @property
    def frame_len(self) -> int:
        return self.header_len + self.size


def parse_frame_header(buf: bytes | bytearray | memoryview, pos: int = 0, max_line: int = 4096) -> FrameHeader | None:
    """Parse the ``BATCH`` line at ``buf[pos:]``.

    Returns ``None`` when the line is not complete yet (no CRLF within the
    buffered bytes and fewer than ``max_line`` of them).  Raises
    :class:`InvalidBatchError` when the bytes are not a valid frame header.
    """
    b = buf if isinstance(buf, bytes) else bytes(buf[pos : pos + max_line])
    if b is not buf:
        pos = 0
    nl = b.find(b"\r\n", pos, pos + max_line)
    if nl < 0:
        if len(b) - pos >= max_line:
            raise InvalidBatchError("frame header too long")
        return None
    words = b[pos:nl].split(b" ")
    if len(words) != 5 or words[0] != b"BATCH":
        raise InvalidBatchError("not a BATCH line")
    size, crc, count = parse_uint(words[1]), parse_uint(words[3]), parse_uint(words[4])
    if size is None or crc is None or count is None or not valid_topic(words[2]):
        raise InvalidBatchError("bad BATCH line")
    return FrameHeader(size, words[2], crc, count, nl + 2 - pos)


def check_frame(buf: bytes, pos: int = 0, end: int | None = None) -> FrameHeader | None:
    """The header of the valid frame starting at ``buf[pos]`` and ending at or before ``end``, else None.

    Valid: the ``BATCH`` line parses, the body lies within ``buf[:end]``, its
    CRC matches and its MSG framing is exact with the header's message count.
    The one "is this a good stored frame" test of the storage layer.
    """
    stop = len(buf) if end is None else min(end, len(buf))
    try:
        h = parse_frame_header(buf, pos)
        if h is None or pos + h.frame_len > stop:
            return None
    except InvalidBatchError:
        return None
    body = pos + h.header_len
    return None if body_fault(buf, body, pos + h.frame_len, h.crc, h.count) else h


CHECKSUM_MISMATCH: Final = "checksum mismatch"
INVALID_BATCH: Final = "invalid batch"


def body_fault(buf: bytes, body: int, end: int, crc: int, count: int) -> str | None:
    """Why the body ``buf[body:end]`` does not match its header's ``crc`` and message ``count``
    (:data:`CHECKSUM_MISMATCH` or :data:`INVALID_BATCH`, the wire's reasons), or None.

    The one body check: a request's (which answers with the reason) and a stored
    frame's (:func:`check_frame`)."""
    if crc32(memoryview(buf)[body:end]) != crc:
        return CHECKSUM_MISMATCH
    try:
        n = count_messages(buf, body, end)
    except InvalidBatchError:
        return INVALID_BATCH
    return None if n == count else INVALID_BATCH
