"""Sans-I/O reply parser for the client.  No trio imports: bytes in, replies out.

A client knows what kind of request each reply answers (replies come back in
request order), so it asks for the next reply *of a kind*::

    parser = ReplyParser()
    parser.receive_data(data)
    reply = parser.next_reply(ReplyKind.OFFSET)   # -> OffsetReply | ErrorReply | NEED_DATA

======================  ====================================================
request                 successful reply
======================  ====================================================
BATCH                   :class:`OffsetReply` (``OK <offset> 1``)
SEEK (extension)        :class:`OffsetReply` (``OK <offset>``)
READ / TAIL             :class:`ReadReply` (``OK <offset> <n>`` + n frames)
STATS / CONFIG / TOPICS :class:`MokReply` (``MOK <len>`` + body + CRLF)
CLOSE                   :class:`OkReply` (``OK``)
PING                    :class:`PongReply` (``PONG``)
======================  ====================================================

Any of them may instead be :class:`ErrorReply`.  Bytes that are not a valid
reply raise :class:`~logd_trio.core.errors.BadReply`; after that the parser is
dead (the stream cannot be resynchronised).

Buffering is bounded: the raw buffer holds at most one stored frame plus one
reply line beyond what was fed in one ``receive_data`` call, because a READ
reply is consumed frame by frame as its bytes arrive; the parsed batches of a
single READ reply are capped at ``max_reply`` bytes.  Every batch's CRC is
verified as it is parsed (:class:`~logd_trio.core.errors.ChecksumMismatch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Final

from logd_trio.core.defaults import DEFAULT_MAX_REPLY
from logd_trio.core.errors import (
    BadReply,
    ChecksumMismatch,
    ClientError,
    CorruptDataReply,
    InvalidBatch,
    InvalidBatchError,
    InvalidRequest,
    InvalidTopic,
    MaxTopics,
    NotAllowed,
    NotFoundReply,
    ServerError,
    TopicNotAllowed,
)
from logd_trio.core.framing import crc32, iter_messages, parse_frame_header, parse_uint
from logd_trio.core.records import Record
from logd_trio.core.requests import MAX_LINE, NEED_DATA, NeedData

__all__ = [
    "NEED_DATA",
    "ErrorReply",
    "Message",
    "MokReply",
    "NeedData",
    "OffsetReply",
    "OkReply",
    "PongReply",
    "ReadBatch",
    "ReadReply",
    "Reply",
    "ReplyKind",
    "ReplyParser",
    "error_for_reason",
]



class ReplyKind(Enum):
    """What the next reply answers; decides how its bytes are parsed."""

    OFFSET = "BATCH"
    SEEK = "SEEK"  # ``OK <offset>`` (an extension), parsed as an OffsetReply
    READ = "READ/TAIL"
    MOK = "STATS/CONFIG/TOPICS"
    OK = "CLOSE"
    PONG = "PING"


class OffsetReply(Record):
    """``OK <offset> 1``: where the written batch begins."""

    offset: int


class Message(Record):
    """One message read from a topic.

    ``offset`` is the offset of the batch holding it and ``delta`` the byte
    position of its ``MSG`` line inside that batch's body; (offset, delta) is
    the message's position, as a consumer checkpoint records it.
    """

    topic: str
    offset: int
    delta: int
    body: bytes


class ReadBatch(Record):
    """One stored batch of a READ/TAIL reply, CRC verified.

    ``offset`` is the batch's own offset: the reply's offset for the first batch
    and the previous batch's offset plus its ``frame_len`` for each next one.
    """

    offset: int
    topic: str
    crc: int
    count: int
    frame_len: int
    body: bytes

    @property
    def next_offset(self) -> int:
        return self.offset + self.frame_len

    def messages(self) -> Iterator[tuple[int, bytes]]:
        """``(delta, body)`` for each message; delta = position of its MSG line in the body."""
        return iter_messages(self.body)

    def to_messages(self) -> list[Message]:
        topic, offset = self.topic, self.offset
        return [Message(topic, offset, delta, body) for delta, body in iter_messages(self.body)]


class ReadReply(Record):
    """``OK <offset> <n>`` followed by ``n`` frames."""

    offset: int
    batches: tuple[ReadBatch, ...]

    @property
    def next_offset(self) -> int:
        """Offset right after the last batch (the head, if the reply reached it)."""
        return self.batches[-1].next_offset if self.batches else self.offset

    @property
    def message_count(self) -> int:
        return sum(b.count for b in self.batches)

    def messages(self) -> list[Message]:
        """Every message of every batch, in order, with correct offsets and deltas."""
        out: list[Message] = []
        for b in self.batches:
            out.extend(b.to_messages())
        return out

    def __iter__(self) -> Iterator[Message]:
        for b in self.batches:
            yield from b.to_messages()

    def __len__(self) -> int:
        return self.message_count


class MokReply(Record):
    """``MOK <len>\\r\\n<body>\\r\\n``."""

    body: bytes

    def fields(self) -> dict[str, str]:
        """The body's ``key: value`` lines as a dict (blank lines skipped)."""
        out: dict[str, str] = {}
        for line in self.body.decode("utf-8", "replace").split("\r\n"):
            if not line:
                continue
            key, sep, value = line.partition(":")
            out[key.strip()] = value.strip() if sep else ""
        return out


class OkReply(Record):
    """``OK`` (reply to CLOSE)."""


class PongReply(Record):
    """``PONG`` (reply to the PING extension)."""


class ErrorReply(Record):
    """``ERR <reason>`` (reason is ``""`` for a bare ``ERR``)."""

    reason: str

    def exception(self) -> ClientError:
        return error_for_reason(self.reason)


Reply = OffsetReply | ReadReply | MokReply | OkReply | PongReply | ErrorReply

_REASONS: Final[dict[str, type[ClientError]]] = {
    "not found": NotFoundReply,
    "invalid request": InvalidRequest,
    "invalid protocol": InvalidRequest,
    "unknown command": InvalidRequest,
    "checksum mismatch": ChecksumMismatch,
    "invalid batch": InvalidBatch,
    "invalid topic": InvalidTopic,
    "request missing topic": InvalidTopic,
    "topic not allowed": TopicNotAllowed,
    "not allowed": NotAllowed,
    "maximum topics allowed": MaxTopics,
    "corrupt data": CorruptDataReply,
}


def error_for_reason(reason: str) -> ClientError:
    """The one place where an ``ERR`` reason becomes a typed exception."""
    cls = _REASONS.get(reason, ServerError)
    text = f"server error: {reason}" if reason else "server error (bare ERR)"
    return cls(text, reason=reason)


class _ReadState:
    """A READ reply being parsed: its batches so far."""

    __slots__ = ("batches", "next_offset", "offset", "remaining", "size")

    def __init__(self, offset: int, remaining: int, next_offset: int) -> None:
        self.offset = offset
        self.remaining = remaining
        self.next_offset = next_offset
        self.size = 0
        self.batches: list[ReadBatch] = []


class ReplyParser:
    """Turns the server's byte stream into replies, one :meth:`next_reply` call at a time."""

    __slots__ = ("_buf", "_dead", "_pos", "_read", "max_reply")

    def __init__(self, *, max_reply: int = DEFAULT_MAX_REPLY) -> None:
        self.max_reply = max_reply
        self._buf = bytearray()
        self._pos = 0
        self._read: _ReadState | None = None
        self._dead: BadReply | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not consumed yet."""
        return len(self._buf) - self._pos

    @property
    def in_reply(self) -> bool:
        """True while part of a READ reply has been consumed but not returned."""
        return self._read is not None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        pos = self._pos
        if pos:
            if pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            elif pos >= 65536 or pos * 2 >= len(self._buf):
                del self._buf[:pos]
                self._pos = 0
        self._buf += data

    def _fail(self, message: str) -> BadReply:
        self._dead = BadReply(f"bad reply from server: {message}")
        self._buf = bytearray()
        self._pos = 0
        self._read = None
        return self._dead

    def _line(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        nl = buf.find(b"\r\n", pos, pos + MAX_LINE)
        if nl < 0:
            if len(buf) - pos >= MAX_LINE:
                raise self._fail("reply line too long")
            return None
        self._pos = nl + 2
        return bytes(buf[pos:nl])

    def next_reply(self, kind: ReplyKind) -> Reply | NeedData:
        """The next complete reply to a request of ``kind``, or :data:`NEED_DATA`."""
        if self._dead is not None:
            raise self._dead
        if self._read is not None:
            if kind is not ReplyKind.READ:
                raise RuntimeError("a READ reply is in progress")
            return self._frames(self._read)
        start = self._pos
        line = self._line()
        if line is None:
            return NEED_DATA
        if line.startswith(b"ERR"):
            if line == b"ERR":
                return ErrorReply("")
            if line[3] == 0x20:
                return ErrorReply(line[4:].decode("utf-8", "replace"))
        words = line.split(b" ")
        if kind is ReplyKind.OFFSET:
            if len(words) == 3 and words[0] == b"OK":
                offset = parse_uint(words[1])
                if offset is not None and words[2] == b"1":
                    return OffsetReply(offset)
        elif kind is ReplyKind.SEEK:
            if len(words) == 2 and words[0] == b"OK" and (offset := parse_uint(words[1])) is not None:
                return OffsetReply(offset)
        elif kind is ReplyKind.READ:
            if len(words) == 3 and words[0] == b"OK":
                offset, n = parse_uint(words[1]), parse_uint(words[2])
                if offset is not None and n is not None and n > 0:
                    self._read = _ReadState(offset, n, offset)
                    return self._frames(self._read)
        elif kind is ReplyKind.MOK:
            if len(words) == 2 and words[0] == b"MOK":
                size = parse_uint(words[1])
                if size is not None:
                    if size > self.max_reply:
                        raise self._fail(f"MOK body of {size} bytes is over the limit")
                    end = self._pos + size + 2
                    if len(self._buf) < end:
                        self._pos = start
                        return NEED_DATA
                    if self._buf[end - 2 : end] != b"\r\n":
                        raise self._fail("MOK body not followed by CRLF")
                    body = bytes(self._buf[self._pos : end - 2])
                    self._pos = end
                    return MokReply(body)
        elif kind is ReplyKind.OK:
            if line == b"OK":
                return OkReply()
        elif kind is ReplyKind.PONG and line == b"PONG":
            return PongReply()
        raise self._fail(f"unexpected reply to {kind.value}: {line[:80]!r}")

    def _frames(self, st: _ReadState) -> ReadReply | NeedData:
        buf = self._buf
        while st.remaining:
            pos = self._pos
            try:
                head = parse_frame_header(buf, pos)
            except InvalidBatchError as exc:
                raise self._fail(f"stored frame: {exc}") from None
            if head is None:
                return NEED_DATA
            end = pos + head.frame_len
            if st.size + head.frame_len > self.max_reply:
                raise self._fail(f"READ reply larger than {self.max_reply} bytes")
            if len(buf) < end:
                return NEED_DATA
            body = bytes(buf[pos + head.header_len : end])
            self._pos = end
            topic = head.topic.decode("ascii")
            if crc32(body) != head.crc:
                self._dead = BadReply("checksum mismatch in a batch read from the server")
                err = ChecksumMismatch(
                    f"checksum mismatch in batch at offset {st.next_offset} of topic {topic!r}"
                )
                self._buf = bytearray()
                self._pos = 0
                self._read = None
                raise err
            st.batches.append(ReadBatch(st.next_offset, topic, head.crc, head.count, head.frame_len, body))
            st.next_offset += head.frame_len
            st.size += head.frame_len
            st.remaining -= 1
        self._read = None
        return ReadReply(st.offset, tuple(st.batches))
