"""Option values converted without pydantic (cli.coercion) give what typer's own pydantic
conversion gives, for every parameter of every command; ``logd write`` never imports pydantic."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import typer
import typer.core
import typer.main
from typer import _click, _coercion

from cli import coercion
from cli import main as cli_main

from ..client.ports import refused_address

SAMPLES: list[Any] = ["0", "1", "-1", "3", " 7 ", "2.5", "1e3", "-0", "abc", "", "true", "No", "on", "400ms",
                      "1m30s", "127.0.0.1:1774", "x,y", "inf", "nan", "1_000", "./some/path", 0, 5, 2.0, 0.4,
                      True, False]


def outcome(runtime: Any, value: Any, param: Any, ctx: Any) -> tuple[str, Any]:
    try:
        got = runtime.coerce(value, param=param, ctx=ctx)
    except _click.exceptions.BadParameter:
        return ("usage error", None)
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
