"""``logd auth``: helpers for ``--auth-file`` (docs/security.md)."""

from __future__ import annotations

import secrets
import sys
from typing import Annotated

import typer

from logd_trio.server.auth import hash_token

auth_app = typer.Typer(name="auth", help="Helpers for --auth-file: token hashes.", no_args_is_help=True)


@auth_app.command("hash-token")
def hash_token_cmd(
    generate: Annotated[bool, typer.Option(
        "--generate", help="Make a new random token (32 bytes); print it, then its hash.")] = False,
) -> None:
    """Print the line an auth file stores for a token read from stdin (one line), or for a new one."""
    if generate:
        token = secrets.token_urlsafe(32)
        typer.echo(f"token: {token}")
    else:
        token = sys.stdin.readline().strip()
        if not token:
            typer.echo("logd auth hash-token: no token on stdin (or use --generate)", err=True)
            raise typer.Exit(2)
        if not token.isascii() or not token.isprintable() or " " in token:
            typer.echo("logd auth hash-token: a token is printable ASCII without spaces", err=True)
            raise typer.Exit(2)
    typer.echo(f'token = "{hash_token(token)}"')


def register(app: typer.Typer) -> None:
    app.add_typer(auth_app)
