"""The FETCH extension between logd-trio nodes (replication), sans-I/O.  No trio imports.

Request (one line)::

    FETCH <node-id> <epoch> <topic> <offset> <max_bytes> <wait_ms>

``epoch`` is the leader epoch the follower believes in (0: not known yet);
``offset`` is where the follower's durable log ends, which is also its
acknowledgement of everything before it.  Reply::

    FETCHED <leader_epoch> <batch_epoch> <first> <head> <offset> <nbytes> <starts> <hw>\\r\\n<nbytes bytes>

``batch_epoch`` wrote every frame of the reply (a reply never crosses an
epoch boundary); ``first``/``head`` are the leader's retained start and
readable head; ``starts`` lists the offsets in ``[offset, offset+nbytes)``
where the leader starts a partition (``-`` for none, else comma-separated);
``hw`` is the leader's high watermark (what the in-sync set holds durably:
a follower's readers stop there).  A reply of an older node has no ``hw``
(its head stands for it).
The bytes are whole stored frames.  Or ``ERR <reason>``.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from logd_trio.core.errors import BadReply, RequestError
from logd_trio.core.framing import parse_uint, valid_topic
from logd_trio.core.records import Record

__all__ = [
    "FETCH_NEED_DATA", "Fetch", "FetchError", "FetchHeader", "FetchReply", "FetchReplyParser",
    "encode_fetch", "encode_fetch_header", "parse_fetch",
]

MAX_FETCH_LINE: Final = 64 * 1024


class _Need(Enum):
    NEED_DATA = "NEED_DATA"


FETCH_NEED_DATA: Final = _Need.NEED_DATA


class Fetch(Record):
    node: str
    epoch: int
    topic: str
    offset: int
    max_bytes: int
    wait_ms: int


def parse_fetch(words: list[bytes]) -> Fetch:
    """The words of a ``FETCH`` line (command included).  Raises :class:`RequestError`."""
    if len(words) != 7:
        raise RequestError("invalid request")
    if not valid_topic(words[1]):
        raise RequestError("invalid node id")
    if not words[3]:
        raise RequestError("request missing topic")
    if not valid_topic(words[3]):
        raise RequestError("invalid topic")
    nums = [parse_uint(w) for w in (words[2], words[4], words[5], words[6])]
    epoch, offset, max_bytes, wait_ms = nums
    if epoch is None or offset is None or max_bytes is None or wait_ms is None or max_bytes < 1:
        raise RequestError("invalid request")
    return Fetch(words[1].decode("ascii"), epoch, words[3].decode("ascii"), offset, max_bytes, wait_ms)


def encode_fetch(node: str, epoch: int, topic: str, offset: int, max_bytes: int, wait_ms: int) -> bytes:
    return b"FETCH %s %d %s %d %d %d\r\n" % (node.encode("ascii"), epoch, topic.encode("ascii"), offset,
                                            max_bytes, wait_ms)


class FetchHeader(Record):
    leader_epoch: int
    batch_epoch: int
    first: int
    head: int
    offset: int
    nbytes: int
    starts: tuple[int, ...] = ()
    hw: int = -1  # the leader's high watermark (-1: not told, the head stands for it)

    @property
    def high_watermark(self) -> int:
        return self.head if self.hw < 0 else min(self.hw, self.head)


def encode_fetch_header(h: FetchHeader) -> bytes:
    starts = b",".join(b"%d" % s for s in h.starts) or b"-"
    line = b"FETCHED %d %d %d %d %d %d %s" % (h.leader_epoch, h.batch_epoch, h.first, h.head, h.offset,
                                               h.nbytes, starts)
    return line + (b" %d\r\n" % h.hw if h.hw >= 0 else b"\r\n")


class FetchReply(Record):
    header: FetchHeader
    data: bytes


class FetchError(Record):
    reason: str


def _header(line: bytes) -> FetchHeader:
    words = line.split(b" ")
    if len(words) not in (8, 9) or words[0] != b"FETCHED":
        raise BadReply(f"not a FETCH reply: {line[:80]!r}")
    nums = [parse_uint(w) for w in words[1:7]]
    if any(n is None for n in nums):
        raise BadReply(f"bad FETCH reply line: {line[:80]!r}")
    le, be, first, head, offset, nbytes = (int(n) for n in nums if n is not None)
    starts: tuple[int, ...] = ()
    if words[7] != b"-":
        parsed = [parse_uint(w) for w in words[7].split(b",")]
        if any(s is None for s in parsed):
            raise BadReply(f"bad partition starts in a FETCH reply: {words[7][:80]!r}")
        starts = tuple(int(s) for s in parsed if s is not None)
        if any(not offset <= s < offset + nbytes for s in starts) or list(starts) != sorted(set(starts)):
            raise BadReply("partition starts outside the FETCH reply's range")
    hw = -1
    if len(words) == 9:
        told = parse_uint(words[8])
        if told is None:
            raise BadReply(f"bad high watermark in a FETCH reply: {words[8][:80]!r}")
        hw = told
    return FetchHeader(le, be, first, head, offset, nbytes, starts, hw)


class FetchReplyParser:
    """Bytes in, :class:`FetchReply` / :class:`FetchError` out, one reply per request.

    ``max_bytes`` bounds a reply's data; a bigger one (or any malformed byte)
    raises :class:`~logd_trio.core.errors.BadReply`, after which the stream
    cannot be trusted (close it).
    """

    __slots__ = ("_buf", "_header", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._header: FetchHeader | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_reply(self) -> FetchReply | FetchError | _Need:
        buf = self._buf
        h = self._header
        if h is None:
            nl = buf.find(b"\r\n", 0, MAX_FETCH_LINE)
            if nl < 0:
                if len(buf) >= MAX_FETCH_LINE or (b"\n" in buf):
                    raise BadReply("FETCH reply line too long or not CRLF-terminated")
                return FETCH_NEED_DATA
            line = bytes(buf[:nl])
            if line.startswith(b"ERR"):
                del buf[: nl + 2]
                return FetchError(line[4:].decode("ascii", "replace"))
            h = _header(line)
            if h.nbytes > self.max_bytes:
                raise BadReply(f"FETCH reply of {h.nbytes} bytes exceeds {self.max_bytes}")
            del buf[: nl + 2]
            self._header = h
        if len(buf) < h.nbytes:
            return FETCH_NEED_DATA
        data = bytes(buf[: h.nbytes])
        del buf[: h.nbytes]
        self._header = None
        return FetchReply(h, data)
