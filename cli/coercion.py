"""Option values without pydantic, for a fast start.

typer (0.2x) checks and converts every parameter's value with a pydantic ``TypeAdapter``,
built when the value is processed: importing pydantic and building the adapters costs
about 0.15 s of every command, more than the rest of typer.  Our commands' parameters are
plain: ``str``, ``int`` and ``float`` (``min``/``max`` bounds), ``bool`` from an
environment variable, ``Path``, a ``parser=``, optional or in a list.  For those,
:func:`install` gives typer a conversion of its own with the same results (values, and
pydantic's message for a bad one); anything else (choices, dates, clamping, file types...)
keeps typer's adapter.  The hook uses typer's private modules (pyproject pins the minor
release): if they differ, it is not set, or it fails its self-check and is taken back.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import typer

Convert = Callable[[Any], Any]

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"", "0", "off", "f", "false", "n", "no"})


class Invalid(ValueError):
    """A bad value; its text is the one typer's pydantic conversion gives."""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(sys.getfilesystemencoding(), "replace")
    return str(value)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    elif isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    elif (not isinstance(value, (int, float, bytes)) or (isinstance(value, float) and not value.is_integer())
          or (isinstance(value, int) and value.bit_length() > 63)):
        raise Invalid("Input should be a valid boolean")
    raise Invalid("Input should be a valid boolean, unable to interpret input")


# What pydantic reads as an integer: ASCII digits, single underscores between them, a
# sign, and a fraction of zeros ("2.0"); surrounding white space is dropped.
_INTEGER = re.compile(r"[+-]?[0-9](?:_?[0-9])*(?:\.0+)?")


def _parse(kind: type[int] | type[float], value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        text = _text(value).strip()
        if kind is int:
            if _INTEGER.fullmatch(text):
                return int(text.partition(".")[0])
            raise Invalid("Input should be a valid integer, unable to parse string as an integer")
        try:
            if text.isascii():
                return float(text)
        except ValueError:
            pass
        raise Invalid("Input should be a valid number, unable to parse string as a number")
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        raise Invalid("Input should be a valid number")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise Invalid("Input should be a finite number")
        if not value.is_integer():
            raise Invalid("Input should be a valid integer, got a number with a fractional part")
        return int(value)
    raise Invalid("Input should be a valid integer")


def _bound(limit: float) -> str:
    return str(int(limit)) if isinstance(limit, float) and limit.is_integer() else str(limit)


def _number(kind: type[int] | type[float], low: float | None, high: float | None) -> Convert:
    def convert(value: Any) -> Any:
        number = _parse(kind, value)
        if high is not None and not number <= high:  # "not <=": nan is out of range too
            raise Invalid(f"Input should be less than or equal to {_bound(high)}")
        if low is not None and not number >= low:
            raise Invalid(f"Input should be greater than or equal to {_bound(low)}")
        return number

    return convert


def _parsed(parser: Convert) -> Convert:
    def convert(value: Any) -> Any:
        try:
            return parser(value)
        except Invalid:
            raise
        except ValueError as exc:  # pydantic's wording for an error in a validator
            raise Invalid(f"Value error, {exc}") from exc
        except AssertionError as exc:
            raise Invalid(f"Assertion failed, {exc}") from exc

    return convert


def _leaf(annotation: Any, info: Any) -> Convert | None:
    """A conversion for one value of ``annotation``, or None (typer's adapter then)."""
    parser = getattr(info, "parser", None)
    if parser is not None:
        return _parsed(parser)
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
    """Give typer's parameters the conversions above (once per process).

    Any surprise from the typer installed (its internals are private) leaves typer's own
    conversions in place: the hook is set only if it builds and passes :func:`_self_check`."""
    try:
        from typer import _coercion, _param_types, core
        from typer._click.utils import _escape_control_characters as escape
    except ImportError:  # another typer: it keeps its own conversions
        return
    param_class = getattr(core, "_TyperParameter", None)
    original = getattr(param_class, "get_runtime_param", None)
    if param_class is None or original is None or getattr(original, "_logd_plain", False):
        return
    try:
        hook = _hook(_coercion.RuntimeParam, _param_types.coerce_cli_path, escape, original)
        param_class.get_runtime_param = hook
        if _self_check():
            return
    except Exception:  # a typer we do not know: its own conversions then
        pass
    param_class.get_runtime_param = original


def _hook(base: Any, check_path: Callable[..., Any], escape: Callable[[str], str], original: Any) -> Any:
    @dataclass(frozen=True)
    class Plain(base):  # type: ignore[misc]
        convert: Convert

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                return self.convert(value)
            except Invalid as exc:
                raise typer.BadParameter(escape(str(exc)), ctx=ctx, param=param) from exc

    @dataclass(frozen=True)
    class PlainPath(base):  # type: ignore[misc]
        path_type: type[Path]

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if isinstance(value, str | os.PathLike) and not isinstance(value, self.path_type):
                value = self.path_type(value)  # what typer's own Path check is then given
            return check_path(value, self.parameter_info, path_type=self.path_type, param=param, ctx=ctx)

    def plain(desc: Any) -> Any:
        info, annotation = desc.parameter_info, desc.annotation
        if getattr(desc, "file_annotation", None) is not None:
            return None
        bare = _strip_none(annotation)
        if isinstance(bare, type) and issubclass(bare, Path) and getattr(info, "parser", None) is None:
            path_type = getattr(info, "path_type", None) or bare
            if isinstance(path_type, type) and issubclass(path_type, Path):
                return PlainPath(parameter_info=info, annotation=annotation, path_type=path_type)
            return None
        convert = conversion(annotation, info)
        return None if convert is None else Plain(parameter_info=info, annotation=annotation, convert=convert)

    def get_runtime_param(self: Any) -> Any:
        if self._runtime_param is None:
            with contextlib.suppress(Exception):  # a parameter of a kind not foreseen: typer's own
                self._runtime_param = plain(self.type_descriptor)
        return original(self)  # typer's own, unless set above

    get_runtime_param._logd_plain = True  # type: ignore[attr-defined]
    return get_runtime_param


_HERE = Path(".")


def _self_check() -> bool:
    """One command of each kind of plain parameter converts with the hook as it should."""
    app = typer.Typer()

    @app.command()
    def sample(count: Annotated[int, typer.Option(min=1)] = 1, where: Path = _HERE) -> None:
        """A command the hook is tried on."""

    command = typer.main.get_command(app)
    ctx = command.make_context("sample", ["--count", "2.0", "--where", "x"])
    if ctx.params != {"count": 2, "where": Path("x")}:
        return False
    kinds = {type(p.get_runtime_param()).__name__ for p in command.params}  # type: ignore[attr-defined]
    if kinds != {"Plain", "PlainPath"}:
        return False
    try:
        command.make_context("sample", ["--count", "0"])
    except typer.BadParameter as exc:
        return exc.message == "Input should be greater than or equal to 1"
    return False
