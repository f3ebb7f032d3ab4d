"""The client's sans-I/O reply parser, against every byte-exact reply in the
Go conformance transcripts, three ways: whole buffer, one byte at a time, and
with trailing bytes (h11's test_io shape)."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from logd_trio.core.errors import (
    BadReply,
    ChecksumMismatch,
    CorruptDataReply,
    InvalidBatch,
    InvalidRequest,
    InvalidTopic,
    MaxTopics,
    NotFound,
    ServerError,
    TopicNotAllowed,
)
from logd_trio.core.framing import build_body, build_frame
from logd_trio.core.replies import (
    NEED_DATA,
    ErrorReply,
    MokReply,
    OffsetReply,
    OkReply,
    PongReply,
    ReadReply,
    Reply,
    ReplyKind,
    ReplyParser,
    error_for_reason,
)
from logd_trio.core.requests import REPLY_OK, REPLY_PONG, reply_err, reply_mok, reply_offset, reply_read_header

from ..harness import CONFORMANCE


def _bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("latin-1")
    out = b""
    for piece in value:
        out += piece.encode("latin-1") if isinstance(piece, str) else piece["repeat"].encode("latin-1") * piece[
            "count"]
    return out


def request_kinds(data: bytes) -> list[ReplyKind]:
    """Which reply kind each request in ``data`` expects (the client always knows this)."""
    kinds: list[ReplyKind] = []
    pos = 0
    table = {b"READ": ReplyKind.READ, b"TAIL": ReplyKind.READ, b"STATS": ReplyKind.MOK,
             b"CONFIG": ReplyKind.MOK, b"TOPICS": ReplyKind.MOK, b"CLOSE": ReplyKind.OK,
             b"PING": ReplyKind.PONG}
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        words = data[pos:nl].rstrip(b"\r").split(b" ")
        pos = nl + 1
        if words[0] == b"BATCH":
            kinds.append(ReplyKind.OFFSET)
            if len(words) > 1 and words[1].isdigit():
                pos += int(words[1])
        else:
            kinds.append(table.get(words[0], ReplyKind.OK))
    return kinds


def serialize(reply: Reply) -> bytes:
    """The server-side serializers, used to check that parsing loses nothing."""
    if isinstance(reply, OffsetReply):
        return reply_offset(reply.offset)
    if isinstance(reply, ReadReply):
        return reply_read_header(reply.offset, len(reply.batches)) + b"".join(
            build_frame(b.topic, b.body, b.count) for b in reply.batches)
    if isinstance(reply, MokReply):
        return reply_mok(reply.body)
    if isinstance(reply, ErrorReply):
        return reply_err(reply.reason)
    if isinstance(reply, OkReply):
        return REPLY_OK
    assert isinstance(reply, PongReply)
    return REPLY_PONG


def exact_cases() -> list[tuple[str, list[ReplyKind], bytes]]:
    """Scenarios whose replies are all byte-exact: (name, kinds, all reply bytes)."""
    if CONFORMANCE is None:
        return []
    cases = json.loads((CONFORMANCE / "cases.json").read_text())
    out = []
    for case in cases:
        sent = b""
        expected = b""
        ok = True
        for step in case["steps"]:
            exp = step.get("expect")
            if not isinstance(exp, str | list):
                ok = False
                break
            sent += _bytes(step.get("send", ""))
            expected += _bytes(exp)
        if ok and expected:
            out.append((case["name"], request_kinds(sent), expected))
    return out


CASES = exact_cases()


needs_shared = pytest.mark.skipif(
    CONFORMANCE is None, reason="shared/conformance not found beside the repository (set LOGD_SHARED_DIR)"
)


@needs_shared
def test_cases_loaded() -> None:
    names = {c[0] for c in CASES}
    assert {"batch_and_read", "crlf_in_bodies", "pipelining", "max_size_batch", "ping"} <= names


def parse_all(kinds: list[ReplyKind], chunks: list[bytes], parser: ReplyParser) -> list[Reply]:
    replies: list[Reply] = []
    it = iter(kinds)
    kind = next(it, None)
    for chunk in chunks:
        parser.receive_data(chunk)
        while kind is not None:
            r = parser.next_reply(kind)
            if r is NEED_DATA:
                break
            assert not isinstance(r, type(NEED_DATA))
            replies.append(r)
            kind = next(it, None)
    return replies


@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
@pytest.mark.parametrize(("name", "kinds", "data"), CASES, ids=[c[0] for c in CASES])
def test_conformance_replies(name: str, kinds: list[ReplyKind], data: bytes, mode: str) -> None:
    parser = ReplyParser()
    if mode == "bytewise":
        chunks = [data[i : i + 1] for i in range(len(data))] if len(data) < 20000 else [
            data[i : i + 997] for i in range(0, len(data), 997)]
    elif mode == "trailing":
        chunks = [data + b"OK 5 1\r\nxx"]
    else:
        chunks = [data]
    replies = parse_all(kinds, chunks, parser)
    assert len(replies) == len(kinds)
    assert b"".join(serialize(r) for r in replies) == data
    assert parser.buffered == (len(b"OK 5 1\r\nxx") if mode == "trailing" else 0)
    for r in replies:
        if isinstance(r, ReadReply):
            off = r.offset
            for b in r.batches:
                assert b.offset == off
                assert zlib.crc32(b.body) == b.crc
                off += b.frame_len
            assert r.next_offset == off


def test_batch_and_read_offsets_and_deltas() -> None:
    data = _bytes("OK 66 2\r\nBATCH 14 batch_and_read 213595666 1\r\nMSG 5\r\nthird\r\n"
                  "BATCH 33 batch_and_read 920027543 3\r\nMSG 1\r\na\r\nMSG 2\r\nbb\r\nMSG 3\r\nccc\r\n")
    p = ReplyParser()
    p.receive_data(data)
    r = p.next_reply(ReplyKind.READ)
    assert isinstance(r, ReadReply)
    got = [(m.offset, m.delta, m.body) for m in r]
    # second batch: 66 + len("BATCH 14 batch_and_read 213595666 1\r\n") + 14 = 117
    assert got == [(66, 0, b"third"), (117, 0, b"a"), (117, 10, b"bb"), (117, 21, b"ccc")]
    assert r.next_offset == 187
    assert r.message_count == 4


def test_crc_mismatch_in_read_reply() -> None:
    body = build_body([b"hello"])
    frame = b"BATCH %d t %d 1\r\n" % (len(body), zlib.crc32(body) ^ 1) + body
    p = ReplyParser()
    p.receive_data(b"OK 0 1\r\n" + frame)
    with pytest.raises(ChecksumMismatch):
        p.next_reply(ReplyKind.READ)
    with pytest.raises(BadReply):  # dead afterwards
        p.next_reply(ReplyKind.OFFSET)


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (ReplyKind.OFFSET, b"OK\r\n"),
        (ReplyKind.OFFSET, b"OK 1 2\r\n"),
        (ReplyKind.OFFSET, b"OK x 1\r\n"),
        (ReplyKind.READ, b"OK 0 0\r\n"),
        (ReplyKind.READ, b"OK 0 1\r\nBATCH x t 1 1\r\n"),
        (ReplyKind.MOK, b"MOK 3\r\nabcXY"),
        (ReplyKind.MOK, b"OK\r\n"),
        (ReplyKind.OK, b"OK 1 1\r\n"),
        (ReplyKind.PONG, b"PING\r\n"),
        (ReplyKind.OK, b"X" * 5000),
        (ReplyKind.OK, b"ERRfoo\r\n"),
    ],
)
def test_bad_replies(kind: ReplyKind, data: bytes) -> None:
    p = ReplyParser()
    p.receive_data(data)
    with pytest.raises(BadReply):
        p.next_reply(kind)


def test_incomplete_replies_need_data() -> None:
    for kind, data in [(ReplyKind.OFFSET, b"OK 12"), (ReplyKind.MOK, b"MOK 10\r\nabc"),
                       (ReplyKind.READ, b"OK 0 1\r\nBATCH 5 t 1 1\r\nMS"), (ReplyKind.OK, b"")]:
        p = ReplyParser()
        p.receive_data(data)
        assert p.next_reply(kind) is NEED_DATA


def test_max_reply_bounds_buffering() -> None:
    p = ReplyParser(max_reply=100)
    p.receive_data(b"OK 0 1\r\nBATCH 500 t 1 1\r\n")
    with pytest.raises(BadReply):
        p.next_reply(ReplyKind.READ)
    p = ReplyParser(max_reply=100)
    p.receive_data(b"MOK 1000\r\n")
    with pytest.raises(BadReply):
        p.next_reply(ReplyKind.MOK)


def test_read_reply_consumed_frame_by_frame() -> None:
    frames = [build_frame("t", build_body([b"x" * 1000]), 1) for _ in range(20)]
    p = ReplyParser()
    p.receive_data(b"OK 0 20\r\n")
    assert p.next_reply(ReplyKind.READ) is NEED_DATA
    for f in frames[:-1]:
        p.receive_data(f)
        assert p.next_reply(ReplyKind.READ) is NEED_DATA
        assert p.buffered < 2 * len(f)  # frames are taken out as they complete
    p.receive_data(frames[-1])
    r = p.next_reply(ReplyKind.READ)
    assert isinstance(r, ReadReply) and len(r.batches) == 20
    assert [b.offset for b in r.batches] == [i * len(frames[0]) for i in range(20)]


@pytest.mark.parametrize(
    ("reason", "cls"),
    [
        ("not found", NotFound),
        ("invalid request", InvalidRequest),
        ("checksum mismatch", ChecksumMismatch),
        ("invalid batch", InvalidBatch),
        ("invalid topic", InvalidTopic),
        ("request missing topic", InvalidTopic),
        ("topic not allowed", TopicNotAllowed),
        ("maximum topics allowed", MaxTopics),
        ("corrupt data", CorruptDataReply),
        ("something else", ServerError),
        ("", ServerError),
    ],
)
def test_error_mapping(reason: str, cls: type[Exception]) -> None:
    p = ReplyParser()
    p.receive_data(reply_err(reason))
    r = p.next_reply(ReplyKind.READ)
    assert r == ErrorReply(reason)
    exc = error_for_reason(reason)
    assert isinstance(exc, cls)
    assert exc.reason == reason


def test_mok_fields() -> None:
    body = b"Host: 127.0.0.1:1774\r\nTimeout: 15s\r\nIdleTimeout: 30s\r\nMaxBatchSize: 65536\r\n"
    p = ReplyParser()
    p.receive_data(reply_mok(body) + reply_mok(b""))
    r = p.next_reply(ReplyKind.MOK)
    assert isinstance(r, MokReply)
    assert r.fields()["MaxBatchSize"] == "65536"
    assert p.next_reply(ReplyKind.MOK) == MokReply(b"")
