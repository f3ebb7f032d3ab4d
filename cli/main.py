"""``logd``: the typer application.  Subcommands live in sibling modules.

``main()`` imports only the module of the command it runs (``logd write`` needs neither
the server nor the bench engine: a fast start for a one-line write); ``--help``, no
command, or a command not in ``_MODULES`` registers them all.  ``app`` (for tests and
embedding) is the application with every command.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from logd_trio._version import __version__

from . import coercion

# Every command module, in help order.
_ALL = ("serve_cmd", "write_cmd", "read_cmd", "info_cmds", "bench_cmd", "topic_cmds", "auth_cmd", "cluster_cmd")
# Command name -> its module (a command missing here still works: everything is registered then).
_MODULES = {"serve": "serve_cmd", "write": "write_cmd", "read": "read_cmd", "stats": "info_cmds",
            "config": "info_cmds", "topics": "info_cmds", "ping": "info_cmds", "bench": "bench_cmd",
            "topic": "topic_cmds", "auth": "auth_cmd",
            "cluster": "cluster_cmd"}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"logd-trio {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """logd-trio: a fast, durable log transport (Go logd compatible)."""


def make_app(modules: tuple[str, ...] = _ALL) -> typer.Typer:
    """The application with the commands of ``modules`` (sibling module names).  Option values
    are converted without pydantic (:mod:`.coercion`: a faster start)."""
    coercion.install()
    new = typer.Typer(
        name="logd",
        help="logd-trio: a fast, durable log transport (Go logd compatible).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    new.callback()(_root)
    for name in modules:
        importlib.import_module(f"{__package__}.{name}").register(new)
    return new


def _modules_for(argv: list[str]) -> tuple[str, ...]:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None or "--help" in argv[: argv.index(command)]:
        return _ALL
    module = _MODULES.get(command)
    return _ALL if module is None else (module,)


_app: typer.Typer | None = None


def __getattr__(name: str) -> typer.Typer:
    global _app
    if name == "app":
        if _app is None:
            _app = make_app()
        return _app
    raise AttributeError(name)


def main() -> None:
    make_app(_modules_for(sys.argv[1:]))()


if __name__ == "__main__":
    main()
