"""BatchBuilder.add_many (the bulk framing behind ``write_many``) against a model: the same
batches, in order, as framing one message at a time and sealing when the next does not fit."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logd_trio.client.batches import MAX_MSG_OVERHEAD, BatchBuilder, WriteBatch, _Heads
from logd_trio.core.errors import MessageTooLarge
from logd_trio.core.framing import build_body, build_frame, framed_size, parse_frame_header


def model(limit: int, before: list[bytes], new: list[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
    """Batches sealed while adding ``new`` after ``before`` (already in the batch being built),
    and what is left in the batch being built.  A message over the (conservative) body limit
    that still fits a request of its own is a batch alone."""
    sealed: list[list[bytes]] = []
    current, size = list(before), sum(framed_size(len(m)) for m in before)
    for m in new:
        framed = framed_size(len(m))
        if size + framed > limit and current:
            sealed.append(current)
            current, size = [], 0
        if framed > limit:
            sealed.append([m])
            continue
        current.append(m)
        size += framed
    return sealed, current


def too_large(batch_size: int, m: bytes) -> bool:
    """No request of ``m`` alone fits in ``batch_size`` bytes."""
    return len(build_frame(b"t", build_body([m]), 1)) > batch_size


def builder(batch_size: int, before: list[bytes]) -> BatchBuilder:
    b = BatchBuilder("t", b"t")
    b.set_limit(batch_size)
    if before:
        sealed, _ = b.add_many(before, 0, 1.0)
        assert not sealed
    return b


def state(b: BatchBuilder) -> tuple[bytes, int, int]:
    return b"".join(b.parts), b.size, b.count


messages = st.lists(st.binary(max_size=300) | st.integers(300, 3100).map(b"m".__mul__), max_size=60)


def test_the_property_reaches_the_path_for_big_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generated messages are big enough, now and then, for add_many's other path."""
    calls: list[int] = []
    real = BatchBuilder._add_many_big

    def counted(self: BatchBuilder, msgs: list[bytes], seq: int, now: float) -> tuple[list[WriteBatch], int]:
        calls.append(len(msgs))
        return real(self, msgs, seq, now)

    monkeypatch.setattr(BatchBuilder, "_add_many_big", counted)
    test_add_many_seals_the_batches_one_at_a_time_would()
    assert len(calls) >= 20


@settings(max_examples=300, deadline=None)
@given(batch_size=st.integers(400, 3000), before=st.lists(st.binary(max_size=40), max_size=5), new=messages)
def test_add_many_seals_the_batches_one_at_a_time_would(batch_size: int, before: list[bytes],
                                                         new: list[bytes]) -> None:
    b = builder(batch_size, before)
    start = state(b)
    if any(too_large(batch_size, m) for m in new):
        with pytest.raises(MessageTooLarge):
            b.add_many(new, len(before), 2.0)
        assert state(b) == start  # all or nothing
        return
    want_sealed, want_rest = model(b.body_limit, before, new)
    sealed, queued = b.add_many(new, len(before), 2.0)
    assert [s.messages() for s in sealed] == want_sealed
    assert all(len(s.request) <= batch_size for s in sealed)
    assert [s.count for s in sealed] == [len(m) for m in want_sealed]
    # last_seq: how many messages were ever queued when the batch's last one was
    ends = [sum(len(m) for m in want_sealed[: i + 1]) for i in range(len(want_sealed))]
    assert [s.last_seq for s in sealed] == ends
    for s in sealed:  # each request is exactly the one encoder's frame of its messages
        assert s.request == build_frame(b"t", build_body(s.messages()), s.count)
    body, size, count = state(b)
    assert (body, size, count) == (build_body(want_rest), len(build_body(want_rest)), len(want_rest))
    # what the queue grew by: every sealed request plus the batch being built, less what was there
    assert queued == sum(len(s.request) for s in sealed) + size - start[1]
    if count and new and (sealed or not before):
        assert b.since == 2.0  # the batch being built started in this call (an empty one has none)
    elif before:
        assert b.since == 1.0


def test_a_message_too_large_changes_nothing() -> None:
    b = builder(1000, [b"kept"])
    before = state(b)
    with pytest.raises(MessageTooLarge):
        b.add_many([b"a" * 100] * 20 + [b"x" * 1000], 1, 2.0)
    assert state(b) == before


def test_a_message_above_the_conservative_limit_is_a_batch_of_its_own() -> None:
    b = builder(1000, [b"kept"])
    # framed, it is over the body limit (which allows for the longest BATCH line), yet its
    # own request, with its real BATCH line, fits in the batch size
    big = b"y" * (b.body_limit - 10)
    assert framed_size(len(big)) > b.body_limit and len(big) + MAX_MSG_OVERHEAD > b.body_limit
    sealed, _ = b.add_many([b"a", big, b"b"], 1, 2.0)
    assert [s.messages() for s in sealed] == [[b"kept", b"a"], [big]]
    assert [s.last_seq for s in sealed] == [2, 3]
    assert state(b)[2] == 1 and b"".join(b.parts).endswith(b"b\r\n")
    header = parse_frame_header(sealed[1].request)
    assert header is not None and header.count == 1


def test_receipts_of_the_batch_being_built_go_with_it() -> None:
    b = builder(400, [b"r"])
    marker: list[object] = []
    b.receipts = marker  # type: ignore[assignment]  # any list: only its identity is followed
    sealed, _ = b.add_many([b"z" * 100] * 5, 1, 2.0)
    first: WriteBatch = sealed[0]
    assert first.receipts is marker
    assert all(s.receipts is None for s in sealed[1:]) and b.receipts is None


def test_messages_that_fill_the_batch_exactly_share_it() -> None:
    b = builder(1000, [])
    a = b"a" * 10
    rest = b.body_limit - framed_size(len(a))
    big = b"b" * (rest - len(b"MSG 999\r\n") - 2)
    assert framed_size(len(a)) + framed_size(len(big)) == b.body_limit
    sealed, _ = b.add_many([a, big, b"c"], 0, 2.0)
    assert [s.messages() for s in sealed] == [[a, big]]
    assert state(b)[2] == 1
    over = b"o" * (b.body_limit - framed_size(1) + 1 - len(b"MSG 999\r\n") - 2)
    assert framed_size(1) + framed_size(len(over)) == b.body_limit + 1
    sealed, _ = b.add_many([over], 3, 3.0)  # one byte too many with b"c": that batch is sealed
    assert [s.messages() for s in sealed] == [[b"c"]] and state(b)[2] == 1


def test_msg_lines_come_from_a_bounded_table() -> None:
    heads = _Heads(bound=100)
    rng = random.Random(7)
    seen = 0
    for _ in range(300):  # lengths below and past the bound, calls of 1 to 20 messages
        lengths = [rng.randrange(130) for _ in range(rng.randrange(1, 21))]
        assert heads.lines(lengths, max(lengths)) == [b"MSG %d\r\n" % n for n in lengths]
        seen += len(lengths)
        assert len(heads.table) <= min(100, seen)  # never past the bound, nor ahead of the work
    assert heads.table == [b"MSG %d\r\n" % n for n in range(len(heads.table))]
    table = heads.table
    assert len(table) > 60  # it grew, and stays: past the bound it formats and keeps the table
    heads.lines([150] * 50, 150)
    assert heads.table is table and heads.lines([5], 5)[0] is table[5]


def test_a_one_line_write_formats_one_line() -> None:
    heads = _Heads()
    assert heads.lines([1000], 1000) == [b"MSG 1000\r\n"] and heads.table == []
    assert heads.lines([1000] * 500, 1000)[0] == b"MSG 1000\r\n" and heads.table == []  # 501 < 1001
    heads.lines([1000] * 500, 1000)
    assert len(heads.table) == 1001  # paid for by the 1001 lines formatted
    assert heads.lines([3, 1000], 1000) == [b"MSG 3\r\n", b"MSG 1000\r\n"]
