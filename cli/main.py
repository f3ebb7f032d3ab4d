"""``logd``: the typer application.  Subcommands live in sibling modules."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="logd",
    help="logd-trio: a fast, durable log transport (Go logd compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """logd-trio: a fast, durable log transport (Go logd compatible)."""


def _register() -> None:
    from . import bench_cmd, info_cmds, read_cmd, serve_cmd, write_cmd

    serve_cmd.register(app)
    write_cmd.register(app)
    read_cmd.register(app)
    info_cmds.register(app)
    bench_cmd.register(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
