"""Request parser: one table of cases, fed whole, one byte at a time, and with
trailing bytes (h11's three ways); hypothesis round trips; bounded buffering."""

from __future__ import annotations

import gc
import tracemalloc
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logd_trio.core import requests as p
from logd_trio.core.errors import InvalidBatchError, RequestError
from logd_trio.core.framing import build_body, count_messages, iter_messages, valid_topic


def batch(topic: bytes, msgs: list[bytes], *, count: int | None = None, crc: int | None = None) -> bytes:
    body = build_body(msgs)
    n = len(msgs) if count is None else count
    c = zlib.crc32(body) if crc is None else crc
    return b"BATCH %d %s %d %d\r\n" % (len(body), topic, c, n) + body


OK_CASES: list[tuple[bytes, p.Request]] = [
    (b"READ t 0 1\r\n", p.Read("t", 0, 1)),
    (b"READ a.b-c_D 18446744073709551615 50000\r\n", p.Read("a.b-c_D", 2**64 - 1, 50000)),
    (b"READ t 5 2 300\r\n", p.Read("t", 5, 2, 300)),
    (b"READ t 0000000000000000000007 0000000000000000000000001\r\n", p.Read("t", 7, 1)),
    (b"TAIL t 0\r\n", p.Tail("t", 1)),
    (b"TAIL t 7\r\n", p.Tail("t", 7)),
    (b"STATS\r\n", p.Stats()),
    (b"CONFIG\r\n", p.Config()),
    (b"CLOSE\r\n", p.Close()),
    (b"PING\r\n", p.Ping()),
    (b"TOPICS\r\n", p.Topics()),
    (batch(b"default", [b"hi", b"hallo", b"sup"]),
     p.Batch("default", 3, batch(b"default", [b"hi", b"hallo", b"sup"]))),
    (batch(b"t", [b"", b"MSG 3\r\nabc\r\n", b"\r\n\n\r"]),
     p.Batch("t", 3, batch(b"t", [b"", b"MSG 3\r\nabc\r\n", b"\r\n\n\r"]))),
]

# (request, reason, connection must close)
ERR_CASES: list[tuple[bytes, str, bool]] = [
    (b"FOO bar\r\n", "unknown command", False),
    (b"read t 0 1\r\n", "unknown command", False),
    (b"READ t 0\r\n", "invalid request", False),
    (b"READ\r\n", "invalid request", False),
    (b"READ t x 1\r\n", "invalid request", False),
    (b"READ t +1 1\r\n", "invalid request", False),
    (b"READ t 18446744073709551616 1\r\n", "invalid request", False),
    (b"READ t 0 0\r\n", "invalid request", False),
    (b"READ t 0 50001\r\n", "invalid request", False),
    (b"READ t 0 1 x\r\n", "invalid request", False),
    (b"READ ../x 0 1\r\n", "invalid topic", False),
    (b"READ  0 1\r\n", "request missing topic", False),
    (b"TAIL  1\r\n", "request missing topic", False),
    (b"TAIL t\r\n", "invalid request", False),
    (b"TAIL t 50001\r\n", "invalid request", False),
    (b"STATS x\r\n", "invalid request", False),
    (b"\n", "invalid request", False),
    (b"PING\n", "invalid request", False),
    (b"\r\n", "unknown command", False),
    (batch(b"../x", [b"m"]), "invalid topic", False),
    (batch(b"a" * 256, [b"m"]), "invalid topic", False),
    (batch(b"t", [b"hello"], crc=1), "checksum mismatch", False),
    (batch(b"t", [b"hello", b"x"], count=5), "invalid batch", False),
    (batch(b"t", [b"m"], count=0), "invalid batch", False),
    (b"BATCH 23 t %d 1\r\nthis is not msg framing" % zlib.crc32(b"this is not msg framing"),
     "invalid batch", False),
    (b"BATCH 13 t %d 1\r\nMSG 5\nhello\r\n" % zlib.crc32(b"MSG 5\nhello\r\n"), "invalid batch", False),
    (b"BATCH 10 t 1653298240 18446744073709551617\r\nMSG 1\r\nm\r\n", "invalid request", False),
    (b"BATCH x t 0 1\r\n", "invalid request", True),
    (b"BATCH 10 t 1\r\n", "invalid request", True),
    (b"BATCH 1000000 t 0 1\r\n", "batch too large", True),
    (b"X" * 5000 + b"\r\n", "request line too long", True),
    (b"BATCH 14 t 1 1\nMSG 5\r\nhello\r\n", "invalid request", True),  # body must not run as requests
]


def feed_whole(data: bytes, parser: p.RequestParser) -> Iterator[p.Request | str]:
    parser.receive_data(data)
    yield from drain(parser)


def feed_bytewise(data: bytes, parser: p.RequestParser) -> Iterator[p.Request | str]:
    for i in range(len(data)):
        parser.receive_data(data[i : i + 1])
        for ev in drain(parser):
            yield ev
            if isinstance(ev, str) and ev.endswith(" close"):
                return


def drain(parser: p.RequestParser) -> Iterator[p.Request | str]:
    while True:
        try:
            ev = parser.next_event()
        except RequestError as e:
            yield f"ERR {e.reason}{' close' if e.close else ''}"
            if e.close:
                return
            continue
        if ev is p.NEED_DATA:
            return
        yield ev


FEEDERS = [feed_whole, feed_bytewise]
TRAILER = b"PING\r\n"


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("data", "expected"), OK_CASES)
def test_ok(feed: object, data: bytes, expected: p.Request) -> None:
    assert callable(feed)
    assert list(feed(data, p.RequestParser())) == [expected]
    # with trailing bytes: the next request parses too
    assert list(feed(data + TRAILER, p.RequestParser())) == [expected, p.Ping()]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("data", "reason", "close"), ERR_CASES)
def test_errors(feed: object, data: bytes, reason: str, close: bool) -> None:
    assert callable(feed)
    want = f"ERR {reason}{' close' if close else ''}"
    events = list(feed(data + TRAILER, p.RequestParser()))
    assert events[0] == want
    if close:
        assert events == [want]  # nothing after a fatal error
    else:
        assert events == [want, p.Ping()]  # the connection stays usable


def test_dead_parser_stays_dead() -> None:
    parser = p.RequestParser()
    parser.receive_data(b"BATCH x t 0 1\r\nPING\r\n")
    with pytest.raises(RequestError):
        parser.next_event()
    parser.receive_data(b"PING\r\n")
    with pytest.raises(RequestError) as info:
        parser.next_event()
    assert info.value.close


def test_max_request_is_line_plus_body() -> None:
    """65536 bytes in all is accepted; one more is refused before the body arrives."""
    body_len = 65536 - len(b"BATCH 65495 max_size_batch 1051711612 1\r\n")
    msg = b"c" * (body_len - len(b"MSG 65482\r\n\r\n"))
    req = batch(b"max_size_batch", [msg])
    assert len(req) == 65536
    assert list(feed_whole(req, p.RequestParser())) == [p.Batch("max_size_batch", 1, req)]
    big = batch(b"max_size_batch", [msg + b"c"])
    parser = p.RequestParser()
    parser.receive_data(big[:60])  # line only: refused at once
    assert list(drain(parser)) == ["ERR batch too large close"]


def test_buffering_is_bounded() -> None:
    parser = p.RequestParser(max_request=1000)
    parser.receive_data(b"BATCH 900 t 0 1\r\n" + b"x" * 500)
    assert list(drain(parser)) == []
    assert parser.buffered < 1000
    parser = p.RequestParser()
    parser.receive_data(b"A" * 4095)
    assert list(drain(parser)) == []
    parser.receive_data(b"A")
    assert list(drain(parser)) == ["ERR request line too long close"]


def test_reply_serializers() -> None:
    assert p.reply_offset(66) == b"OK 66 1\r\n"
    assert p.reply_read_header(0, 3) == b"OK 0 3\r\n"
    assert p.reply_mok(b"a: 1\r\n") == b"MOK 6\r\na: 1\r\n\r\n"
    assert p.reply_err("not found") == b"ERR not found\r\n"
    assert p.reply_err("") == b"ERR\r\n"
    assert p.encode_read("t", 5, 2) == b"READ t 5 2\r\n"
    assert p.encode_read("t", 5, 2, 100) == b"READ t 5 2 100\r\n"
    assert p.encode_tail("t", 2) == b"TAIL t 2\r\n"
    # the example of PROTOCOL.md
    body = build_body([b"hi", b"hallo", b"sup"])
    assert p.encode_batch("default", body, 3) == (
        b"BATCH 37 default 702548520 3\r\nMSG 2\r\nhi\r\nMSG 5\r\nhallo\r\nMSG 3\r\nsup\r\n")


topics = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=20).filter(lambda t: t not in (".", ".."))
messages = st.lists(st.binary(max_size=40), min_size=1, max_size=8)


@settings(max_examples=200)
@given(topic=topics, msgs=messages, split=st.integers(min_value=0, max_value=400))
def test_batch_round_trip(topic: str, msgs: list[bytes], split: int) -> None:
    body = build_body(msgs)
    frame = p.encode_batch(topic, body, len(msgs))
    parser = p.RequestParser()
    cut = min(split, len(frame))
    parser.receive_data(frame[:cut])
    got = list(drain(parser))
    parser.receive_data(frame[cut:])
    got += list(drain(parser))
    assert got == [p.Batch(topic, len(msgs), frame)]
    assert [m for _, m in iter_messages(body)] == msgs
    assert count_messages(body) == len(msgs)


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_garbage_never_escapes_the_error_family(data: bytes) -> None:
    parser = p.RequestParser(max_request=256)
    parser.receive_data(data)
    for _ in drain(parser):
        pass
    assert parser.buffered <= max(len(data), 0)


@settings(max_examples=300)
@given(data=st.binary(max_size=80))
def test_count_messages_rejects_or_counts(data: bytes) -> None:
    try:
        n = count_messages(data)
    except InvalidBatchError:
        return
    assert n == len(list(iter_messages(data)))
    assert build_body([m for _, m in iter_messages(data)]) == data


def test_valid_topic() -> None:
    assert valid_topic(b"a")
    assert valid_topic(b"a" * 255)
    for bad in (b"", b".", b"..", b"a/b", b"a b", b"bad:name", b"a" * 256, b"\xff"):
        assert not valid_topic(bad)


@pytest.mark.parametrize("size", [0, 1, 9, 31, 98])
def test_the_uniform_walk_rejects_any_broken_framing_byte(size: int) -> None:
    """Equal-length messages take the strided fast path: it counts them, and a change to any one
    framing byte of any one record (header or trailing CRLF) is rejected, as the exact walk does."""
    msgs = [bytes([65 + i % 26]) * size for i in range(7)]
    body = build_body(msgs)
    assert count_messages(body) == 7 and count_messages(b"xx" + body, 2) == 7
    stride = len(body) // 7
    header = len(b"MSG %d\r\n" % size)
    for record in range(7):
        for col in (*range(header), stride - 2, stride - 1):
            broken = bytearray(body)
            broken[record * stride + col] ^= 0x01  # e.g. "MSG" -> "LSG", "3" -> "2", CR -> FF
            with pytest.raises(InvalidBatchError):
                count_messages(bytes(broken))


def test_the_uniform_walk_keeps_nothing_body_sized() -> None:
    """The walk of equal-length messages may keep what it compares columns with for small bodies
    only: 40 distinct big bodies leave (almost) nothing allocated behind them."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):  # 40 distinct (header, count) keys, each body ~512 KiB of records of 0-9 bytes
            size, n = i % 10, (1 << 19) // (i % 10 + 9) - i
            body = (b"MSG %d\r\n" % size + b"x" * size + b"\r\n") * n  # (as build_body makes it)
            assert count_messages(body) == n
            del body
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 4 << 20, f"{kept} bytes kept"


@pytest.mark.parametrize("size", [0, 5])
def test_a_big_uniform_body_is_checked_as_exactly(size: int) -> None:
    """Bodies past the cached size take the count per column: every framing byte still matters."""
    n = 20000
    body = build_body([b"y" * size] * n)
    assert count_messages(body) == n and count_messages(b"ab" + body, 2) == n
    stride = len(body) // n
    for record in (0, 1, n // 2, n - 1):
        for col in (*range(stride - size - 2), stride - 2, stride - 1):
            broken = bytearray(body)
            broken[record * stride + col] ^= 0x01
            with pytest.raises(InvalidBatchError):
                count_messages(bytes(broken))
