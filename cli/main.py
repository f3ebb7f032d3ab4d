"""``logd``: the typer application.  Subcommands live in sibling modules."""

from __future__ import annotations

from typing import Annotated

import typer

from logd_trio._version import __version__

app = typer.Typer(
    name="logd",
    help="logd-trio: a fast, durable log transport (Go logd compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"logd-trio {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """logd-trio: a fast, durable log transport (Go logd compatible)."""


def _register() -> None:
    from . import bench_cmd, cluster_cmd, info_cmds, read_cmd, serve_cmd, write_cmd

    serve_cmd.register(app)
    write_cmd.register(app)
    read_cmd.register(app)
    info_cmds.register(app)
    bench_cmd.register(app)
    cluster_cmd.register(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
