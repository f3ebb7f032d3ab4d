"""Sans-I/O request parser and reply serializer (server side) and request
encoders (client side).  No trio imports: bytes in, events out.

The parser follows h11's shape: feed bytes with :meth:`RequestParser.receive_data`,
pull events with :meth:`RequestParser.next_event` until it returns
:data:`NEED_DATA`.  A request that breaks the protocol raises
:class:`~logd_trio.core.errors.RequestError` carrying the ``ERR`` reason and whether
the connection must close.  Buffering is capped: never more than one request
line (``max_line``) or one whole request (``max_request``) is held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from logd_trio.core.defaults import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_MESSAGES
from logd_trio.core.errors import RequestError
from logd_trio.core.fetch import Fetch, parse_fetch
from logd_trio.core.framing import body_fault, build_frame, parse_uint, valid_topic

__all__ = [
    "NEED_DATA",
    "Auth",
    "Batch",
    "Close",
    "Config",
    "Delete",
    "Cluster",
    "Epochs",
    "Fetch",
    "NeedData",
    "Ping",
    "Read",
    "Request",
    "RequestParser",
    "Seek",
    "Stats",
    "Tail",
    "Topics",
    "encode_batch",
    "encode_delete",
    "encode_read",
    "encode_seek",
    "encode_tail",
    "reply_err",
    "reply_mok",
    "reply_offset",
    "reply_read_header",
    "reply_seek",
]

MAX_LINE: Final = 4096
MAX_UNIX_MS: Final = (1 << 63) - 1  # a SEEK time beyond this is not a time


class NeedData(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Batch:
    """``BATCH``: ``frame`` is the whole request (line + body), stored as is."""

    topic: str
    count: int
    frame: bytes

    @property
    def size(self) -> int:
        return len(self.frame)


@dataclass(frozen=True, slots=True)
class Read:
    topic: str
    offset: int
    limit: int
    wait_ms: int | None = None  # Part 3 long-poll extension


@dataclass(frozen=True, slots=True)
class Tail:
    topic: str
    limit: int


@dataclass(frozen=True, slots=True)
class Seek:
    """``SEEK <topic> <unix_ms>`` (extension): the offset of the first batch appended at or after
    ``unix_ms`` (Unix milliseconds), the head if none; answered ``OK <offset>``."""

    topic: str
    unix_ms: int


@dataclass(frozen=True, slots=True)
class Stats:
    pass


@dataclass(frozen=True, slots=True)
class Config:
    pass


@dataclass(frozen=True, slots=True)
class Close:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Topics:
    pass


@dataclass(frozen=True, slots=True)
class Delete:
    """``DELETE <topic>`` (extension): remove the topic and its files."""

    topic: str


@dataclass(frozen=True, slots=True)
class Cluster:
    """Extension: the node's view of its cluster (``MOK`` with a JSON body); ``CLUSTER HISTORY``
    (``history``): only its data directory's history id, ``{"history": ID}`` (a follower's check)."""

    history: bool = False


@dataclass(frozen=True, slots=True)
class Epochs:
    """Extension between logd-trio nodes: a topic's leader-epoch entries and head (``MOK``)."""

    topic: str


@dataclass(frozen=True, slots=True)
class Auth:
    """``AUTH <token>`` (logd-trio extension): become the token's principal on this connection."""

    token: str = field(repr=False)  # never in a log line


Request = (Batch | Read | Tail | Stats | Config | Close | Ping | Topics | Fetch | Delete | Auth | Cluster | Epochs
           | Seek)

_SIMPLE: Final[dict[bytes, Request]] = {
    b"STATS": Stats(),
    b"CONFIG": Config(),
    b"CLOSE": Close(),
    b"PING": Ping(),
    b"TOPICS": Topics(),
    b"CLUSTER": Cluster(),
}

INVALID_REQUEST: Final = "invalid request"
INVALID_TOPIC: Final = "invalid topic"
MISSING_TOPIC: Final = "request missing topic"
TLS_NOT_ENABLED: Final = "tls not enabled"
TLS_HELLO: Final = b"\x16"  # the first byte of a TLS handshake; no request starts with it


def _topic(word: bytes) -> str:
    if not word:
        raise RequestError(MISSING_TOPIC)
    if not valid_topic(word):
        raise RequestError(INVALID_TOPIC)
    return word.decode("ascii")


def _limit(word: bytes, max_messages: int, *, zero_is_one: bool = False) -> int:
    n = parse_uint(word)
    if n is None:
        raise RequestError(INVALID_REQUEST)
    if n == 0 and zero_is_one:
        n = 1
    if not 1 <= n <= max_messages:
        raise RequestError(INVALID_REQUEST)
    return n


class RequestParser:
    """Turns a byte stream into :data:`Request` events.

    After a :class:`RequestError` with ``close=True`` the parser is dead: every
    later call raises the same error.
    """

    __slots__ = ("_buf", "_dead", "_pos", "_started", "max_messages", "max_request")

    def __init__(
        self,
        *,
        max_request: int = DEFAULT_MAX_BATCH_SIZE,
        max_messages: int = DEFAULT_MAX_MESSAGES,
    ) -> None:
        self.max_request = max_request
        self.max_messages = max_messages
        self._buf = bytearray()
        self._pos = 0
        self._dead: RequestError | None = None
        self._started = False

    @property
    def held(self) -> int:
        """Bytes the parser's buffer holds, the consumed prefix not yet dropped included."""
        return len(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not self._started and data:
            self._started = True
            if data[:1] == TLS_HELLO:  # a TLS client on a plaintext port: say so, not "invalid request"
                self._dead = RequestError(TLS_NOT_ENABLED, close=True)
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Request | NeedData:
        if self._dead is not None:
            raise self._dead
        buf, pos = self._buf, self._pos
        nl = buf.find(b"\n", pos, pos + MAX_LINE)
        if nl < 0:
            if len(buf) - pos >= MAX_LINE:
                self._die("request line too long")
            return NEED_DATA
        line_end = nl + 1
        if nl == pos or buf[nl - 1] != 0x0D:  # bare LF
            if buf.startswith(b"BATCH", pos) and (nl - pos == 5 or buf[pos + 5] in b" \r"):
                # A BATCH line is followed by a body we cannot delimit: its
                # bytes must not run as requests.
                self._die(INVALID_REQUEST)
            self._pos = line_end  # any other line: its extent is known
            raise RequestError(INVALID_REQUEST)
        line = bytes(buf[pos : nl - 1])
        if line.startswith(b"BATCH") and (line == b"BATCH" or line[5] == 0x20):
            return self._batch(line, line_end)
        self._pos = line_end
        simple = _SIMPLE.get(line)
        if simple is not None:
            return simple
        words = line.split(b" ")
        cmd = words[0]
        if cmd == b"READ":
            if len(words) not in (4, 5):
                raise RequestError(INVALID_REQUEST)
            topic = _topic(words[1])
            offset = parse_uint(words[2])
            if offset is None:
                raise RequestError(INVALID_REQUEST)
            limit = _limit(words[3], self.max_messages)
            wait: int | None = None
            if len(words) == 5:
                wait = parse_uint(words[4])
                if wait is None:
                    raise RequestError(INVALID_REQUEST)
            return Read(topic, offset, limit, wait)
        if cmd == b"TAIL":
            if len(words) != 3:
                raise RequestError(INVALID_REQUEST)
            return Tail(_topic(words[1]), _limit(words[2], self.max_messages, zero_is_one=True))
        if cmd == b"FETCH":  # replication between logd-trio nodes (logd_trio.core.fetch)
            return parse_fetch(words)
        if cmd == b"DELETE":
            if len(words) != 2:
                raise RequestError(MISSING_TOPIC if len(words) == 1 else INVALID_REQUEST)
            return Delete(_topic(words[1]))
        if cmd == b"AUTH":  # one token of printable ASCII (docs/protocol.md, extensions)
            if len(words) != 2 or not words[1] or not all(0x21 <= c <= 0x7E for c in words[1]):
                raise RequestError(INVALID_REQUEST)
            return Auth(words[1].decode("ascii"))
        if cmd == b"SEEK":
            if len(words) != 3:
                raise RequestError(MISSING_TOPIC if len(words) == 1 else INVALID_REQUEST)
            topic = _topic(words[1])
            when = parse_uint(words[2])
            if when is None or when > MAX_UNIX_MS:
                raise RequestError(INVALID_REQUEST)
            return Seek(topic, when)
        if line == b"CLUSTER HISTORY":
            return Cluster(history=True)
        if cmd == b"EPOCHS":
            if len(words) != 2:
                raise RequestError(INVALID_REQUEST)
            return Epochs(_topic(words[1]))
        if cmd in _SIMPLE:
            raise RequestError(INVALID_REQUEST)
        raise RequestError("unknown command")

    def _die(self, reason: str) -> None:
        self._dead = RequestError(reason, close=True)
        self._buf = bytearray()
        self._pos = 0
        raise self._dead

    def _batch(self, line: bytes, line_end: int) -> Request | NeedData:
        words = line.split(b" ")
        if len(words) != 5:
            self._die(INVALID_REQUEST)
        size = parse_uint(words[1])
        if size is None:
            self._die(INVALID_REQUEST)
            raise AssertionError  # unreachable, for type checkers
        start = self._pos
        total = line_end - start + size
        if total > self.max_request:
            self._die("batch too large")
        if len(self._buf) < start + total:
            return NEED_DATA
        buf = self._buf
        frame = bytes(memoryview(buf)[start : start + total])  # one copy (a bytearray slice is another)
        self._pos = start + total
        # The extent is known from here on: errors keep the connection open.
        topic = _topic(words[2])
        crc = parse_uint(words[3])
        count = parse_uint(words[4])
        if crc is None or count is None:
            raise RequestError(INVALID_REQUEST)
        fault = body_fault(frame, line_end - start, total, crc, count)
        if fault is not None:
            raise RequestError(fault)
        return Batch(topic, count, frame)


# ---------------------------------------------------------------- replies


def reply_offset(offset: int) -> bytes:
    """Reply to an accepted BATCH."""
    return b"OK %d 1\r\n" % offset


def reply_read_header(offset: int, nbatches: int) -> bytes:
    """Header of a READ/TAIL reply; the stored frames follow it."""
    return b"OK %d %d\r\n" % (offset, nbatches)


def reply_mok(body: bytes) -> bytes:
    return b"MOK %d\r\n%s\r\n" % (len(body), body)


def reply_err(reason: str) -> bytes:
    return b"ERR %s\r\n" % reason.encode("ascii", "replace") if reason else b"ERR\r\n"


def reply_seek(offset: int) -> bytes:
    """Reply to SEEK."""
    return b"OK %d\r\n" % offset


REPLY_OK: Final = b"OK\r\n"
REPLY_PONG: Final = b"PONG\r\n"


# ---------------------------------------------------------------- client side


#: A complete BATCH request for an already framed body (the one encoder, in framing).
encode_batch = build_frame


def encode_read(topic: str, offset: int, limit: int, wait_ms: int | None = None) -> bytes:
    if wait_ms is None:
        return b"READ %s %d %d\r\n" % (topic.encode("ascii"), offset, limit)
    return b"READ %s %d %d %d\r\n" % (topic.encode("ascii"), offset, limit, wait_ms)


def encode_tail(topic: str, limit: int) -> bytes:
    return b"TAIL %s %d\r\n" % (topic.encode("ascii"), limit)


def encode_seek(topic: str, unix_ms: int) -> bytes:
    return b"SEEK %s %d\r\n" % (topic.encode("ascii"), unix_ms)


def encode_delete(topic: str) -> bytes:
    return b"DELETE %s\r\n" % topic.encode("ascii")
