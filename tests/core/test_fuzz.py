"""Hostile input, sans-I/O: hypothesis and mutation fuzzing of the request parser and of the
client's reply parser, beyond tests/test_protocol.py's single-request cases.

Properties: (1) any split of a request (or reply) stream into receives gives the same events;
(2) mutated streams raise nothing but the protocol error family; (3) buffering stays bounded
by one request (max_request, or a 4096-byte line) plus one receive."""

from __future__ import annotations

import random
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logd_trio.core import requests as p
from logd_trio.core.errors import LogdError
from logd_trio.core.framing import build_body
from logd_trio.core.replies import NEED_DATA, ReplyKind, ReplyParser

from .test_protocol import drain

MAX_REQUEST = 2048
LIMIT = max(MAX_REQUEST, p.MAX_LINE)

topics = st.sampled_from(["t", "default", "a.b-c_9", "x" * 255])
bodies = st.lists(st.binary(max_size=60), min_size=1, max_size=5)
numbers = st.integers(0, 2**64 + 5)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """One request: mostly valid, sometimes a recoverable error (the extent is known)."""
    kind = draw(st.integers(0, 9))
    topic = draw(topics).encode()
    if kind <= 2:
        msgs = draw(bodies)
        return p.encode_batch(topic.decode(), build_body(msgs), len(msgs))
    if kind == 3:
        wait = draw(st.none() | st.integers(0, 10**6))
        tail = b"" if wait is None else b" %d" % wait
        return b"READ %s %d %d%s\r\n" % (topic, draw(numbers), draw(st.integers(0, 60000)), tail)
    if kind == 4:
        return b"TAIL %s %d\r\n" % (topic, draw(st.integers(0, 60000)))
    if kind == 5:
        return draw(st.sampled_from([b"STATS\r\n", b"CONFIG\r\n", b"PING\r\n", b"TOPICS\r\n", b"CLOSE\r\n"]))
    if kind == 6:  # a batch whose line parses but whose body is wrong: ERR, connection stays usable
        body = build_body(draw(bodies))
        crc = zlib.crc32(body) ^ draw(st.integers(0, 1))
        return b"BATCH %d %s %d %d\r\n%s" % (len(body), topic, crc, draw(st.integers(0, 6)), body)
    if kind == 7:
        return draw(st.sampled_from([b"\n", b"\r\n", b"ping\r\n", b"READ t\r\n", b"READ ../x 0 1\r\n",
                                     b"TAIL t 99999999999999999999999\r\n", b"NOPE\r\n", b"READ t -1 1\r\n"]))
    return draw(st.binary(max_size=30)).replace(b"\n", b"") + b"\r\n"


def run(stream: bytes, cuts: list[int], *, check_bound: bool = True) -> list[object]:
    parser = p.RequestParser(max_request=MAX_REQUEST)
    out: list[object] = []
    prev = 0
    for cut in [*sorted(cuts), len(stream)]:
        chunk = stream[prev:cut]
        prev = max(prev, cut)
        parser.receive_data(chunk)
        for ev in drain(parser):
            out.append(ev)
            if isinstance(ev, str) and ev.endswith(" close"):
                return out
        if check_bound:
            # after the events: less than one request pending, and the raw buffer (consumed
            # prefix included) within two requests plus this receive
            assert parser.buffered < LIMIT
            assert parser.held <= 2 * LIMIT + len(chunk)
    return out


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=12), st.lists(st.integers(0, 4000), max_size=20))
def test_random_splits_give_the_same_events(reqs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(reqs)
    whole = run(stream, [])
    assert run(stream, [c % (len(stream) + 1) for c in cuts]) == whole
    assert run(stream, list(range(len(stream)))) == whole  # one byte at a time


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 2:
            del b[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            b[pos:pos] = rng.choice([b"\r\n", b"\n", b"\r", b" ", b"  ", b"\x00" * 64, b"../", b"BATCH ",
                                     b"99999999999999999999999999", b"18446744073709551616", b"-1", b"+1"])
        elif op == 4 and b:  # duplicate a slice
            a = rng.randrange(len(b))
            b[pos:pos] = b[a : a + rng.randint(1, 200)]
        elif op == 5:
            b = b[: rng.randrange(len(b) + 1)]
        else:  # a huge declared size in place of a number
            b[pos:pos] = b"%d" % rng.choice([MAX_REQUEST, MAX_REQUEST + 1, 2**63, 10**30])
    return bytes(b)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=8), st.integers(0, 2**32), st.integers(1, 700))
def test_mutated_streams_only_raise_request_errors(reqs: list[bytes], seed: int, chunk: int) -> None:
    rng = random.Random(seed)
    stream = mutate(rng, b"".join(reqs))
    cuts = list(range(chunk, len(stream), chunk))
    events = run(stream, cuts)  # anything but RequestError escapes and fails the test
    for ev in events:
        if isinstance(ev, p.Batch):
            assert len(ev.frame) <= MAX_REQUEST
    # whatever the split, the same answer
    assert run(stream, []) == events


def test_floods_are_refused_with_bounded_buffering() -> None:
    """NUL floods, endless lines and endless bodies: refused (close) with less than one request held."""
    for flood in (b"\x00" * 100_000, b"A" * 100_000, b"READ " + b"9" * 100_000, b"BATCH " + b"1" * 5000):
        parser = p.RequestParser(max_request=MAX_REQUEST)
        events: list[object] = []
        for i in range(0, len(flood), 4096):
            parser.receive_data(flood[i : i + 4096])
            events += drain(parser)
            assert parser.buffered < LIMIT + 4096
            if events:
                break
        assert events and isinstance(events[-1], str) and events[-1].endswith(" close"), flood[:20]


# ---------------------------------------------------------------- the client's reply parser


@st.composite
def replies(draw: st.DrawFn) -> tuple[ReplyKind, bytes]:
    kind = draw(st.sampled_from(list(ReplyKind)))
    if draw(st.integers(0, 5)) == 0:
        return kind, draw(st.sampled_from([b"ERR\r\n", b"ERR not found\r\n", b"ERR storage error: x\r\n"]))
    if kind is ReplyKind.OFFSET:
        return kind, b"OK %d 1\r\n" % draw(st.integers(0, 2**63))
    if kind is ReplyKind.SEEK:
        return kind, b"OK %d\r\n" % draw(st.integers(0, 2**63))
    if kind is ReplyKind.READ:
        frames = [p.encode_batch(draw(topics), build_body(m), len(m)) for m in draw(st.lists(bodies, min_size=1,
                                                                                                max_size=4))]
        return kind, b"OK %d %d\r\n" % (draw(st.integers(0, 2**40)), len(frames)) + b"".join(frames)
    if kind is ReplyKind.MOK:
        body = draw(st.binary(max_size=200))
        return kind, b"MOK %d\r\n%s\r\n" % (len(body), body)
    if kind is ReplyKind.OK:
        return kind, b"OK\r\n"
    return kind, b"PONG\r\n"


def run_replies(kinds: list[ReplyKind], stream: bytes, cuts: list[int]) -> list[object]:
    parser = ReplyParser(max_reply=1 << 20)
    out: list[object] = []
    i = 0
    prev = 0
    for cut in [*sorted(cuts), len(stream)]:
        parser.receive_data(stream[prev:cut])
        prev = max(prev, cut)
        while i < len(kinds):
            try:
                r = parser.next_reply(kinds[i])
            except LogdError as e:  # BadReply / ChecksumMismatch: the family a client catches
                out.append(("BAD", type(e).__name__))
                return out
            if r is NEED_DATA:
                break
            out.append(r)
            i += 1
        assert parser.buffered <= len(stream)
    return out


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(replies(), min_size=1, max_size=8), st.lists(st.integers(0, 3000), max_size=12))
def test_reply_stream_splits_give_the_same_replies(pairs: list[tuple[ReplyKind, bytes]], cuts: list[int]) -> None:
    kinds = [k for k, _ in pairs]
    stream = b"".join(d for _, d in pairs)
    whole = run_replies(kinds, stream, [])
    assert len(whole) == len(pairs) and not any(isinstance(r, tuple) for r in whole)
    assert run_replies(kinds, stream, [c % (len(stream) + 1) for c in cuts]) == whole


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(replies(), min_size=1, max_size=6), st.integers(0, 2**32), st.integers(1, 300))
def test_mutated_replies_only_raise_the_client_error_family(
    pairs: list[tuple[ReplyKind, bytes]], seed: int, chunk: int
) -> None:
    kinds = [k for k, _ in pairs] * 2
    stream = mutate(random.Random(seed), b"".join(d for _, d in pairs))
    got = run_replies(kinds, stream, list(range(chunk, len(stream), chunk)))
    assert run_replies(kinds, stream, []) == got
