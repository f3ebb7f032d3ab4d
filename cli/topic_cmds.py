"""``logd topic ...``: managing topics on a logd-trio server (``delete``)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from logd_trio.core.defaults import DEFAULT_ADDRESS

from .errors import run
from .options import HostOpt, RetriesOpt, TimeoutOpt, VerboseOpt, check_topic_name, connect_client

topic_app = typer.Typer(name="topic", help="Manage topics (logd-trio servers).", no_args_is_help=True)


@topic_app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="The topic to delete.", callback=check_topic_name)],
    host: HostOpt = DEFAULT_ADDRESS,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    retries: RetriesOpt = 3,
    timeout: TimeoutOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Delete a topic and every batch in it (DELETE). Readers following it get 'ERR topic deleted'."""
    if not yes:
        if not sys.stdin.isatty():
            typer.echo(f"logd topic delete: deleting {name!r} removes all its data; pass --yes to confirm",
                       err=True)
            raise typer.Exit(2)
        typer.confirm(f"Delete topic {name!r} and all its data on {host}?", abort=True)

    async def main() -> None:
        async with connect_client(host, retries, timeout) as client:
            await client.delete_topic(name)

    run("topic delete", main, verbose=verbose)
    typer.echo(f"deleted topic {name}")


def register(app: typer.Typer) -> None:
    app.add_typer(topic_app)
