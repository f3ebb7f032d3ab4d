"""FETCH requests and replies, parsed three ways: whole, one byte at a time, and with trailing bytes."""

from __future__ import annotations

import pytest

from logd_trio.core.errors import BadReply, RequestError
from logd_trio.core.fetch import (
    FETCH_NEED_DATA,
    Fetch,
    FetchError,
    FetchHeader,
    FetchReply,
    FetchReplyParser,
    encode_fetch,
    encode_fetch_header,
)
from logd_trio.core.framing import build_body, build_frame
from logd_trio.core.requests import NEED_DATA, Ping, RequestParser

FRAMES = build_frame("t", build_body([b"a", b"bc"]), 2) + build_frame("t", build_body([b"d"]), 1)
HEADER = FetchHeader(3, 2, 100, 5000, 200, len(FRAMES), (200,))
REPLY = encode_fetch_header(HEADER) + FRAMES


def requests_from(chunks: list[bytes]) -> list[object]:
    parser = RequestParser()
    out: list[object] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while (ev := parser.next_event()) is not NEED_DATA:
            out.append(ev)
    return out


def replies_from(chunks: list[bytes]) -> list[FetchReply | FetchError]:
    parser = FetchReplyParser(max_bytes=1 << 20)
    out: list[FetchReply | FetchError] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while True:
            r = parser.next_reply()
            if r is FETCH_NEED_DATA:
                break
            assert isinstance(r, FetchReply | FetchError)
            out.append(r)
    return out


def ways(data: bytes) -> list[list[bytes]]:
    return [[data], [data[i:i + 1] for i in range(len(data))]]


@pytest.mark.parametrize("split", [0, 1])
def test_fetch_request_round_trip(split: int) -> None:
    data = encode_fetch("node-b", 7, "t.1", 12345, 1 << 20, 500) + b"PING\r\n"
    assert requests_from(ways(data)[split]) == [Fetch("node-b", 7, "t.1", 12345, 1 << 20, 500), Ping()]


@pytest.mark.parametrize(("line", "reason"), [
    (b"FETCH b 1 t 0 10\r\n", "invalid request"),
    (b"FETCH b 1 t 0 10 5 6\r\n", "invalid request"),
    (b"FETCH b! 1 t 0 10 5\r\n", "invalid node id"),
    (b"FETCH b 1 t/x 0 10 5\r\n", "invalid topic"),
    (b"FETCH b x t 0 10 5\r\n", "invalid request"),
    (b"FETCH b 1 t 0 0 5\r\n", "invalid request"),
    (b"FETCH b 1 t -1 10 5\r\n", "invalid request"),
])
def test_bad_fetch_requests(line: bytes, reason: str) -> None:
    parser = RequestParser()
    parser.receive_data(line + b"PING\r\n")
    with pytest.raises(RequestError) as info:
        parser.next_event()
    assert info.value.reason == reason
    assert parser.next_event() == Ping()  # the connection goes on


@pytest.mark.parametrize("split", [0, 1])
def test_fetch_reply_whole_and_bytewise(split: int) -> None:
    data = REPLY + b"ERR fenced: epoch 1, the leader's is 3\r\n" + encode_fetch_header(
        FetchHeader(3, 3, 0, 0, 0, 0, ()))
    got = replies_from(ways(data)[split])
    assert got == [FetchReply(HEADER, FRAMES), FetchError("fenced: epoch 1, the leader's is 3"),
                   FetchReply(FetchHeader(3, 3, 0, 0, 0, 0, ()), b"")]


def test_fetch_reply_with_trailing_bytes_keeps_them() -> None:
    parser = FetchReplyParser(max_bytes=1 << 20)
    parser.receive_data(REPLY + b"FETCHED 1")
    assert parser.next_reply() == FetchReply(HEADER, FRAMES)
    assert parser.next_reply() is FETCH_NEED_DATA
    parser.receive_data(b" 1 0 0 0 0 -\r\n")
    assert parser.next_reply() == FetchReply(FetchHeader(1, 1, 0, 0, 0, 0, ()), b"")


@pytest.mark.parametrize("line", [
    b"FETCHED 1 1 0 0 0 5\r\n",  # missing starts
    b"FETCHED 1 1 0 0 0 x -\r\n",
    b"OK 5 1\r\n",
    b"FETCHED 1 1 0 0 10 5 3\r\n",  # a start outside the range
    b"FETCHED 1 1 0 0 10 5 12,11\r\n",  # not sorted
    b"FETCHED 1 1 0 0 0 99999999 -\r\n",  # over max_bytes
    b"FETCHED 1 1 0 0 0 0 - x\r\n",  # a bad high watermark
    b"FETCHED 1 1 0 0 0 0 - 1 2\r\n",  # a word too many
])
def test_bad_fetch_replies(line: bytes) -> None:
    parser = FetchReplyParser(max_bytes=1 << 20)
    parser.receive_data(line)
    with pytest.raises(BadReply):
        parser.next_reply()


def test_header_encoding() -> None:
    assert encode_fetch_header(FetchHeader(3, 2, 100, 5000, 200, 60, (200, 230))) == \
        b"FETCHED 3 2 100 5000 200 60 200,230\r\n"
    assert encode_fetch_header(FetchHeader(1, 1, 0, 0, 0, 0)) == b"FETCHED 1 1 0 0 0 0 -\r\n"


def test_the_high_watermark_travels_in_the_reply_and_an_older_leaders_head_stands_for_it() -> None:
    told = FetchHeader(3, 2, 100, 5000, 200, len(FRAMES), (200,), hw=4000)
    raw = encode_fetch_header(told)
    assert raw.endswith(b" 200 4000\r\n")
    (reply,) = replies_from([raw + FRAMES])
    assert isinstance(reply, FetchReply) and reply.header == told and reply.header.high_watermark == 4000
    (old,) = replies_from([b"FETCHED 3 2 100 5000 200 0 -\r\n"])
    assert isinstance(old, FetchReply) and old.header.hw == -1 and old.header.high_watermark == 5000
    # a high watermark past the head is capped at it (a follower never shows what the leader does not have)
    assert FetchHeader(1, 1, 0, 10, 0, 0, hw=99).high_watermark == 10
