"""``Record``: the core's value classes behave as the frozen, slotted dataclasses they replace."""

from __future__ import annotations

import copy
import pickle
from dataclasses import FrozenInstanceError

import pytest

from logd_trio.core.fetch import FetchHeader
from logd_trio.core.framing import FrameHeader
from logd_trio.core.records import Record
from logd_trio.core.replies import Message, OffsetReply, OkReply, PongReply
from logd_trio.core.requests import Auth, Cluster, Config, Read, Stats


def test_equality_and_hash_by_class_and_fields() -> None:
    assert Read("t", 1, 2) == Read("t", 1, 2, None)
    assert Read("t", 1, 2) != Read("t", 1, 3)
    assert hash(Read("t", 1, 2)) == hash(Read("t", 1, 2))
    assert Stats() == Stats() and Stats() != Config()  # same (no) fields, other class
    assert OkReply() != PongReply()
    assert Read("t", 1, 2) != ("t", 1, 2, None)
    assert len({Message("t", 0, 0, b"a"), Message("t", 0, 0, b"a"), Message("t", 0, 9, b"a")}) == 2


def test_repr_names_the_fields_in_order_and_hides_secrets() -> None:
    assert repr(Read("t", 1, 2)) == "Read(topic='t', offset=1, limit=2, wait_ms=None)"
    assert repr(Cluster()) == "Cluster(history=False)"
    assert repr(Stats()) == "Stats()"
    assert "sekret" not in repr(Auth("sekret")) and Auth("sekret").token == "sekret"


def test_frozen() -> None:
    r = OffsetReply(5)
    with pytest.raises(FrozenInstanceError):
        r.offset = 6  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del r.offset
    with pytest.raises(AttributeError):
        r.other = 1
    assert r.offset == 5


def test_copy_pickle_and_match() -> None:
    h = FetchHeader(1, 2, 3, 4, 5, 6, (5,), 7)
    assert pickle.loads(pickle.dumps(h)) == h and copy.deepcopy(h) == h
    f = FrameHeader(10, b"t", 99, 1, 20)
    assert copy.copy(f) == f and f.frame_len == 30
    match Read("t", 7, 1):
        case Read(topic, offset):
            assert (topic, offset) == ("t", 7)
        case _:  # pragma: no cover
            pytest.fail("no match")


def test_a_record_class_is_slotted_and_checks_its_defaults() -> None:
    class Point(Record):
        x: int
        y: int = 0

    assert Point.__dict__["__slots__"] == ("x", "y") and Point(1) == Point(x=1, y=0)
    assert repr(Point(2, 3)) == f"{Point.__qualname__}(x=2, y=3)"  # as a dataclass's
    with pytest.raises(TypeError, match="without a default"):
        class Bad(Record):
            a: int = 0
            b: int  # type: ignore[misc]
