"""Option values without pydantic, for a fast start.

typer (0.2x) checks and converts every parameter's value with a pydantic ``TypeAdapter``,
built when the value is processed: importing pydantic and building the adapters costs
about 0.15 s of every command, more than the rest of typer.  Our commands' parameters are
plain: ``str``, ``int`` and ``float`` (``min``/``max`` bounds), ``bool`` from an
environment variable, ``Path``, a ``parser=``, optional or in a list.  For those,
:func:`install` gives typer a conversion of its own with the same results (values, and a
usage error for a bad one); anything else (choices, dates, clamping, file types...) keeps
typer's adapter.  When the typer installed lacks the hook, nothing changes.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import typer

Convert = Callable[[Any], Any]

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"", "0", "off", "f", "false", "n", "no"})


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(sys.getfilesystemencoding(), "replace")
    return str(value)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = _text(value).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a valid boolean")


def _number(kind: type[int] | type[float], low: float | None, high: float | None) -> Convert:
    name = "integer" if kind is int else "number"

    def convert(value: Any) -> Any:
        if isinstance(value, kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = kind(_text(value).strip()) if isinstance(value, (str, bytes)) else kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{value!r} is not a valid {name}") from None
            if kind is int and isinstance(value, float) and number != value:
                raise ValueError(f"{value!r} is not a valid {name}")
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = " and ".join(b for b in (f">= {low}" if low is not None else "",
                                              f"<= {high}" if high is not None else "") if b)
            raise ValueError(f"{number} is not in the range {bounds}")
        return number

    return convert


def _leaf(annotation: Any, info: Any) -> Convert | None:
    """A conversion for one value of ``annotation``, or None (typer's adapter then)."""
    parser = getattr(info, "parser", None)
    if parser is not None:
        return lambda value: parser(value)
    if annotation is str:
        return _text
    if annotation is bool:
        return _flag
    if annotation in (int, float):
        if getattr(info, "clamp", False):
            return None
        return _number(annotation, info.min, info.max)
    return None


def _strip_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def conversion(annotation: Any, info: Any) -> Convert | None:
    """The conversion of a parameter's whole value (a list's items one by one), or None."""
    annotation = _strip_none(annotation)
    if get_origin(annotation) is list:
        (item,) = get_args(annotation) or (str,)
        one = _leaf(_strip_none(item), info)
        if one is None:
            return None
        return lambda value: [one(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return _leaf(annotation, info)


def install() -> None:
    """Give typer's parameters the conversions above (once per process)."""
    try:
        from typer import _coercion, _param_types, core
    except ImportError:  # another typer: it keeps its own conversions
        return
    base = getattr(_coercion, "RuntimeParam", None)
    param_class = getattr(core, "_TyperParameter", None)
    original = getattr(param_class, "get_runtime_param", None)
    coerce_path = getattr(_param_types, "coerce_cli_path", None)
    if base is None or param_class is None or original is None or coerce_path is None:
        return
    if getattr(original, "_logd_plain", False):
        return
    check_path: Callable[..., Any] = coerce_path

    @dataclass(frozen=True)
    class Plain(base):  # type: ignore[misc,valid-type]
        convert: Convert

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                return self.convert(value)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), ctx=ctx, param=param) from None

    @dataclass(frozen=True)
    class PlainPath(base):  # type: ignore[misc,valid-type]
        path_type: type[Path]

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if isinstance(value, str | os.PathLike) and not isinstance(value, self.path_type):
                value = self.path_type(value)  # what typer's own Path check is then given
            return check_path(value, self.parameter_info, path_type=self.path_type, param=param, ctx=ctx)

    def get_runtime_param(self: Any) -> Any:
        if self._runtime_param is None:
            desc = self.type_descriptor
            info, annotation = desc.parameter_info, desc.annotation
            plain = _strip_none(annotation)
            if getattr(desc, "file_annotation", None) is None:
                if isinstance(plain, type) and issubclass(plain, Path) and getattr(info, "parser", None) is None:
                    path_type = getattr(info, "path_type", None) or plain
                    if isinstance(path_type, type) and issubclass(path_type, Path):
                        self._runtime_param = PlainPath(info, annotation, path_type)
                elif (convert := conversion(annotation, info)) is not None:
                    self._runtime_param = Plain(info, annotation, convert)
        return original(self)  # typer's own, unless set above

    get_runtime_param._logd_plain = True  # type: ignore[attr-defined]
    param_class.get_runtime_param = get_runtime_param
