"""Option values converted without pydantic (cli.coercion) give what typer's own pydantic
conversion gives (values and error messages), for every parameter of every command; ``logd
write`` never imports pydantic; a typer whose internals differ keeps its own conversions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.core
import typer.main
from packaging.requirements import Requirement

from cli import coercion
from cli import main as cli_main

from ..client.ports import refused_address

_click = pytest.importorskip("typer._click")  # private: another typer skips these tests
_coercion = pytest.importorskip("typer._coercion")

SAMPLES: list[Any] = ["0", "1", "-1", "3", " 7 ", "2.5", "1e3", "-0", "abc", "", "true", "No", "on", "400ms",
                      "1m30s", "127.0.0.1:1774", "x,y", "inf", "nan", "1_000", "./some/path", 0, 5, 2.0, 0.4,
                      True, False, "2.0", " 2.00 ", "-0.0", "1.0", "2.", "1__0", "+4", "0x10", "\uff11\uff12",
                      "\u0663", "1_0.0", "1e400", "-inf", "yes", "F", "1.0e0", "9" * 25, 1.0, 0.0, -0.0, 2.5,
                      float("inf"), float("nan"), 2**70, -1, "bad\x1b[31m"]


def outcome(runtime: Any, value: Any, param: Any, ctx: Any) -> tuple[str, Any]:
    try:
        got = runtime.coerce(value, param=param, ctx=ctx)
    except _click.exceptions.BadParameter as exc:
        return ("usage error", exc.message)
    except (TypeError, ValueError) as exc:  # a parser= given a value of the wrong type
        return ("error", type(exc))
    if isinstance(got, float) and got != got:
        return ("value", "nan")
    return ("value", (type(got), got))


def parameters() -> list[tuple[str, Any]]:
    group = typer.main.get_command(cli_main.app)
    assert isinstance(group, typer.core.TyperGroup)
    found = []
    for name, command in sorted(group.commands.items()):
        subs = command.commands.items() if isinstance(command, typer.core.TyperGroup) else [("", command)]
        for sub, cmd in subs:
            for p in cmd.params:
                if hasattr(p, "type_descriptor"):
                    found.append((f"{name} {sub} {p.name}".replace("  ", " "), (cmd, p)))
    return found


def test_every_parameter_converts_as_typer_does() -> None:
    checked = 0
    for label, (cmd, param) in parameters():
        ours = param.get_runtime_param()
        theirs = _coercion.build_runtime_param(param.type_descriptor)  # typer's own, with pydantic
        if type(ours) is type(theirs):
            continue  # not a plain parameter: typer's conversion is used
        ctx = _click.core.Context(cmd)
        multi = param.multiple or param.nargs == -1  # click gives such a parameter a tuple
        for value in [(v,) for v in SAMPLES] + [("a", "b"), ()] if multi else SAMPLES:
            assert outcome(ours, value, param, ctx) == outcome(theirs, value, param, ctx), (label, value)
        checked += 1
    assert checked >= 40  # nearly every option of the CLI is plain


def test_the_conversions_of_plain_types() -> None:
    info = typer.models.OptionInfo(min=1, max=5)
    convert = coercion.conversion(int | None, info)
    assert convert is not None
    assert convert("3") == 3
    for bad in ("0", "6", "x", 2.5):
        with pytest.raises(ValueError):
            convert(bad)
    listed = coercion.conversion(list[str], typer.models.OptionInfo())
    assert listed is not None and listed(("a", "b")) == ["a", "b"]
    assert coercion.conversion(dict[str, str], typer.models.OptionInfo()) is None  # typer's own then


def test_logd_write_does_not_import_pydantic() -> None:
    code = ("import sys; sys.argv = ['logd', 'write', '--host', sys.argv[1], '--retries', '1', '--timeout', '1s',"
            " '--flush-interval', '10ms', '--input', '/dev/null']\n"
            "from logd_trio_cli import main\n"
            "try:\n    main.main()\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')))")
    with refused_address() as address:
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60)
    assert "cannot connect" in out.stderr, out.stderr  # every value was converted, then it connected
    assert out.stdout.strip().endswith("[]"), out.stdout


def test_the_messages_are_pydantics() -> None:
    """The wording users saw before (typer's pydantic), checked without typer in between."""
    bounded = coercion.conversion(int, typer.models.OptionInfo(min=1))
    assert bounded is not None and bounded("2.0") == 2 and bounded(" 1_0.00 ") == 10
    for value, message in [("0", "Input should be greater than or equal to 1"),
                           ("x", "Input should be a valid integer, unable to parse string as an integer"),
                           ("\uff11\uff12", "Input should be a valid integer, unable to parse string as an integer"),
                           (2.5, "Input should be a valid integer, got a number with a fractional part")]:
        with pytest.raises(ValueError) as info:
            bounded(value)
        assert str(info.value) == message
    flag = coercion.conversion(bool, typer.models.OptionInfo())
    assert flag is not None and flag(1.0) is True and flag(0.0) is False
    with pytest.raises(ValueError, match=r"^Input should be a valid boolean, unable to interpret input$"):
        flag("bogus")


def test_typer_is_the_pinned_version() -> None:
    """The CI machine installs the pinned typer: the tests above run there, not skip."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    (pin,) = [Requirement(d) for d in project["project"]["dependencies"] if re.match(r"typer\b", d)]
    assert pin.specifier and "<" in str(pin.specifier), pin  # an upper bound: its internals are private
    assert pin.specifier.contains(metadata.version("typer")), (pin, metadata.version("typer"))


CHANGED_TYPER = {
    # a field with a default in typer's RuntimeParam: a subclass with a plain field cannot build
    "field": "import dataclasses, typer._coercion as c\n"
             "@dataclasses.dataclass(frozen=True)\n"
             "class RuntimeParam(c.RuntimeParam):\n    strict: bool = False\n"
             "c.RuntimeParam = RuntimeParam\n",
    # the Path check renamed its keywords (typer's own adapter keeps the one it was built with)
    "path": "import typer._adapters, typer._param_types as p\n"
            "def coerce_cli_path(value, parameter_info, *, path_kind, param=None, ctx=None):\n    return value\n"
            "p.coerce_cli_path = coerce_cli_path\n",
    # the method a runtime parameter converts with is renamed
    "method": "import typer._coercion as c\n"
              "def coerce(self, value, param, ctx):\n"
              "    if value is None:\n        return () if param.multiple or param.nargs == -1 else None\n"
              "    return self._convert(value, param=param, ctx=ctx)\n"
              "c.RuntimeParam.coerce = coerce\n"
              "for k in (c.AdapterRuntimeParam, c.FileRuntimeParam, c.PassThroughRuntimeParam):\n"
              "    k._convert = k._coerce_value\n",
}


@pytest.mark.parametrize("change", sorted(CHANGED_TYPER))
def test_a_changed_typer_keeps_its_own_conversions(change: str, tmp_path: Path) -> None:
    """Every command still works, with typer's own conversion, values and messages."""
    given = tmp_path / "lines"
    given.write_text("a\n")
    code = (CHANGED_TYPER[change] + "import sys\nfrom logd_trio_cli import main\n"
            "for args in (['read', '--limit', '-1'], ['write', '--host', sys.argv[1], '--retries', '1',"
            " '--timeout', '1s', '--batch-size', '4096.0', '--input', sys.argv[2]]):\n"
            "    sys.argv = ['logd', *args]\n"
            "    try:\n        main.main()\n    except SystemExit as e:\n        print('exit', e.code)\n")
    with refused_address() as address:
        out = subprocess.run([sys.executable, "-c", code, address, str(given)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
    assert "Input should be greater than or equal to 0" in out.stderr, out.stderr
    assert "cannot connect" in out.stderr, out.stderr  # write's options converted, then it connected
    assert "Traceback" not in out.stderr, out.stderr
