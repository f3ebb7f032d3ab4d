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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import FrozenInstanceError
from operator import attrgetter
from typing import Any, ClassVar, dataclass_transform

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


@dataclass_transform(frozen_default=True)
class _RecordMeta(type):
    def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any], **kwargs: Any) -> _RecordMeta:
        annotations = ns.get("__annotations__", {})
        fields = tuple(f for f, kind in annotations.items() if not str(kind).startswith(("ClassVar", "typing.")))
        defaults = {f: ns.pop(f) for f in fields if f in ns}
        if defaults and list(defaults) != list(fields[len(fields) - len(defaults):]):
            raise TypeError(f"{name}: a field without a default follows one with a default")
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
