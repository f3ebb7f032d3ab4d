"""A cheap base for the core's small immutable value classes (requests, replies, headers).

A frozen dataclass costs about 1 ms of start-up to create: six methods are generated as
source and compiled one by one, and the class is built twice for its slots.  The client
and the server import some thirty of them.  A :class:`Record` subclass is written like
one (annotated fields in order, defaults after them) and behaves like a frozen, slotted
dataclass: ``__slots__`` from the fields, a generated ``__init__`` (the one method that
is compiled, once per class), equality and hash by class and field values,
``Name(field=value, ...)`` as repr (fields named in ``_hidden`` left out), assignment and
deletion raising ``dataclasses.FrozenInstanceError``, ``__match_args__``, copy and pickle,
and ``__post_init__`` called when the class has one.
Type checkers see it as a frozen dataclass (``dataclass_transform``).

What it does not do is refused with a TypeError when the class is created, never dropped
silently: subclassing a record that has fields, ``InitVar``/``KW_ONLY``, ``field()`` and
mutable (unhashable) defaults, ``_hidden`` naming no field.  Every annotation except a
``ClassVar`` is a field, with or without ``from __future__ import annotations``.
For the core's internal protocol classes; public classes stay dataclasses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import KW_ONLY, Field, FrozenInstanceError, InitVar
from operator import attrgetter
from typing import Any, ClassVar, Final, dataclass_transform, get_origin

__all__ = ["Record"]

_set = object.__setattr__


def _make_init(cls: type, fields: tuple[str, ...], defaults: dict[str, Any]) -> Any:
    """``__init__(self, <fields>)`` setting each field (compiled once for the class)."""
    params = ", ".join(f"{f}=_d_{f}" if f in defaults else f for f in fields)
    body = "".join(f"    _set(self, {f!r}, {f})\n" for f in fields)
    if hasattr(cls, "__post_init__"):  # a check of the values, as a dataclass's
        body += "    self.__post_init__()\n"
    scope: dict[str, Any] = {"_set": _set, **{f"_d_{f}": v for f, v in defaults.items()}}
    exec(f"def __init__(self, {params}) -> None:\n{body}", scope)
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    return init


def _values_of(fields: tuple[str, ...]) -> Callable[[object], tuple[Any, ...]]:
    """The field values of a record as one tuple, at C speed where it can be (``attrgetter``)."""
    if len(fields) > 1:
        return attrgetter(*fields)
    if fields:
        one = attrgetter(fields[0])
        return lambda record: (one(record),)
    return lambda record: ()


_CLASSVAR: Final = re.compile(r"\s*(?:typing\.|t\.)?ClassVar\s*(?:\[|$)")
_UNSUPPORTED: Final = re.compile(r"\s*(?:dataclasses\.)?(?:InitVar|KW_ONLY)\b")
_RESERVED: Final = frozenset({"_fields", "_hidden", "_get", "_values"})


def _is_field(cls_name: str, name: str, kind: object) -> bool:
    """Whether the annotation ``kind`` of ``name`` declares a field (a ``ClassVar`` does not);
    TypeError for what a Record cannot do as a dataclass would (``InitVar``, ``KW_ONLY``)."""
    if isinstance(kind, str):  # ``from __future__ import annotations``: the source text
        if _CLASSVAR.match(kind):
            return False
        unsupported = _UNSUPPORTED.match(kind) is not None
    else:
        if kind is ClassVar or get_origin(kind) is ClassVar:
            return False
        unsupported = kind is KW_ONLY or isinstance(kind, InitVar) or kind is InitVar
    if unsupported:
        raise TypeError(f"{cls_name}.{name}: a Record has no InitVar or KW_ONLY fields (use a dataclass)")
    if name in _RESERVED:
        raise TypeError(f"{cls_name}.{name}: the name is Record's own")
    return True


def _check_default(cls_name: str, name: str, value: object) -> None:
    if isinstance(value, Field):
        raise TypeError(f"{cls_name}.{name}: a Record takes plain defaults, not dataclasses.field()")
    if type(value).__hash__ is None:  # list, dict, set...: one object shared by every instance
        raise TypeError(f"{cls_name}.{name}: mutable default {type(value).__name__} (use an immutable value)")


@dataclass_transform(frozen_default=True)
class _RecordMeta(type):
    def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any], **kwargs: Any) -> _RecordMeta:
        for base in bases:
            if getattr(base, "_fields", ()):
                raise TypeError(f"{name}: a Record with fields ({base.__qualname__}) cannot be subclassed")
        annotations = ns.get("__annotations__", {})
        fields = tuple(f for f, kind in annotations.items() if _is_field(name, f, kind))
        defaults = {f: ns.pop(f) for f in fields if f in ns}
        for f, value in defaults.items():
            _check_default(name, f, value)
        if defaults and list(defaults) != list(fields[len(fields) - len(defaults):]):
            raise TypeError(f"{name}: a field without a default follows one with a default")
        hidden = ns.get("_hidden", ())
        if not set(hidden) <= set(fields):
            raise TypeError(f"{name}._hidden names no field: {sorted(set(hidden) - set(fields))}")
        ns["__slots__"] = fields
        cls = super().__new__(mcls, name, bases, ns, **kwargs)
        if bases:  # a record class, not Record itself
            cls._fields = fields  # type: ignore[attr-defined]
            cls._get = staticmethod(_values_of(fields))  # type: ignore[attr-defined]
            cls.__match_args__ = fields  # type: ignore[attr-defined,misc]
            if fields:
                cls.__init__ = _make_init(cls, fields, defaults)  # type: ignore[misc]
        return cls


class Record(metaclass=_RecordMeta):
    _fields: ClassVar[tuple[str, ...]] = ()  # in the order of the class's annotations
    _hidden: ClassVar[tuple[str, ...]] = ()  # fields not shown by repr (secrets)

    _get: ClassVar[Callable[[object], tuple[Any, ...]]]  # the field values (set for each record class)

    def _values(self) -> tuple[Any, ...]:
        return self.__class__._get(self)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self.__class__._get(self) == self.__class__._get(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.__class__._get(self))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields if name not in self._hidden)
        return f"{self.__class__.__qualname__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return self.__class__, self._values()
