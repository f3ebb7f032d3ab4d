"""Record classes in a module without ``from __future__ import annotations``: their
annotations are objects (``typing.Any``, ``Optional[int]``...), not source text."""

import typing
from typing import Any, ClassVar, Optional, Union

from logd_trio.core.records import Record


class NoFuture(Record):
    a: int
    b: Optional[int] = None  # noqa: UP045 (the typing spelling is the point)
    c: Any = None
    d: typing.Any = 0
    e: Union[int, str] = 1  # noqa: UP007
    f: "int | None" = None
    shared: ClassVar[int] = 5
    shared_too: typing.ClassVar = 6
