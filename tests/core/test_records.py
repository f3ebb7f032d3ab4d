"""``Record``: the core's value classes behave as the frozen, slotted dataclasses they replace."""

from __future__ import annotations

import copy
import pickle
import types
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


def test_every_annotation_but_classvar_is_a_field_without_future_annotations() -> None:
    from .plain_records import NoFuture  # typing.Any, Optional[...], Union[...] as objects

    assert NoFuture._fields == ("a", "b", "c", "d", "e", "f") == NoFuture.__match_args__
    r = NoFuture(1, 2, 3, 4, "x", 6)
    assert (r.a, r.b, r.c, r.d, r.e, r.f) == (1, 2, 3, 4, "x", 6)
    assert NoFuture(1) == NoFuture(1, None, None, 0, 1, None) != NoFuture(1, 2)
    assert repr(NoFuture(1)) == "NoFuture(a=1, b=None, c=None, d=0, e=1, f=None)"
    assert NoFuture.shared == 5 and NoFuture.shared_too == 6 and "shared" not in NoFuture.__dict__["__slots__"]
    with pytest.raises(FrozenInstanceError):
        r.b = 3  # type: ignore[misc]


def test_classvar_spellings_in_source_text_are_not_fields() -> None:
    import typing
    from typing import ClassVar

    class Spelled(Record):
        a: ClassVar[int] = 1
        b: typing.ClassVar[int] = 2
        c: ClassVar = 3
        d: typing.Any = None
        classvar_like: int = 4  # a field whose name only starts like it

    assert Spelled._fields == ("d", "classvar_like") and (Spelled.a, Spelled.b, Spelled.c) == (1, 2, 3)
    assert Spelled(5).d == 5 and Spelled(5, 6).classvar_like == 6


def test_a_record_with_fields_cannot_be_subclassed() -> None:
    class A(Record):
        x: int

    with pytest.raises(TypeError, match=r"B: a Record with fields \(.*A\) cannot be subclassed"):
        class B(A):
            y: int
    with pytest.raises(TypeError, match="cannot be subclassed"):
        class C(A):  # no fields of its own: it would still lose A's in eq, hash and repr
            pass

    class Empty(Record):
        pass

    class D(Empty):  # a record without fields is a base like Record itself
        y: int

    assert D(1) == D(y=1) and repr(D(2)) == f"{D.__qualname__}(y=2)"


@pytest.mark.parametrize("default", [[], {}, set(), bytearray()], ids=lambda d: type(d).__name__)
def test_a_mutable_default_is_refused(default: object) -> None:
    with pytest.raises(TypeError, match=f"Bad.items: mutable default {type(default).__name__}"):
        types.new_class("Bad", (Record,), {},
                        lambda ns: ns.update(__annotations__={"items": "list[int]"}, items=default))


def test_what_a_record_cannot_do_is_refused_at_class_creation() -> None:
    import dataclasses

    with pytest.raises(TypeError, match=r"not dataclasses\.field"):
        class WithField(Record):
            a: int = dataclasses.field(default=0)
    with pytest.raises(TypeError, match="InitVar or KW_ONLY"):
        class WithInitVar(Record):
            a: dataclasses.InitVar[int]
    with pytest.raises(TypeError, match="InitVar or KW_ONLY"):
        types.new_class("WithKwOnly", (Record,), {},
                        lambda ns: ns.update(__annotations__={"_": dataclasses.KW_ONLY, "a": int}))
    with pytest.raises(TypeError, match="Record's own"):
        class Reserved(Record):
            _fields: tuple[str, ...]  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"_hidden names no field: \['tokn'\]"):
        class Typo(Record):
            _hidden = ("tokn",)
            token: str

    class Immutable(Record):  # immutable defaults stay allowed
        xs: tuple[int, ...] = ()
        names: frozenset[str] = frozenset()

    assert Immutable() == Immutable((), frozenset()) and Immutable((1,)).xs == (1,)
