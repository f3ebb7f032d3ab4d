"""The info commands: stats, config, topics, ping."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import typer

from logd_trio.client.client import Client
from logd_trio.core.defaults import DEFAULT_ADDRESS

from .errors import run
from .options import HostOpt, RetriesOpt, TimeoutOpt, VerboseOpt, connect_client


def _info(command: str, host: str, retries: int, timeout: float | None, verbose: bool,
          call: Callable[[Client], Awaitable[str]]) -> None:
    async def main() -> None:
        async with connect_client(host, retries, timeout) as client:
            typer.echo(await call(client))

    run(command, main, verbose=verbose)


def stats(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
          verbose: VerboseOpt = False) -> None:
    """Print the server's counters."""

    async def call(c: Client) -> str:
        return "\n".join(f"{k}: {v}" for k, v in (await c.stats()).items())

    _info("stats", host, retries, timeout, verbose, call)


def config(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
           verbose: VerboseOpt = False) -> None:
    """Print the server's configuration (CONFIG)."""

    async def call(c: Client) -> str:
        return "\n".join(f"{k}: {v}" for k, v in (await c.config()).fields.items())

    _info("config", host, retries, timeout, verbose, call)


def topics(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
           verbose: VerboseOpt = False) -> None:
    """List topics with their first and head offsets (logd-trio servers)."""

    async def call(c: Client) -> str:
        return "\n".join(f"{name}: {first} {head}" for name, (first, head) in (await c.topics()).items())

    _info("topics", host, retries, timeout, verbose, call)


def ping(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
         verbose: VerboseOpt = False) -> None:
    """Check that the server answers; prints the round-trip time."""

    async def call(c: Client) -> str:
        rtt = await c.ping()
        return f"PONG from {c.address} in {rtt * 1000:.2f} ms"

    _info("ping", host, retries, timeout, verbose, call)


def register(app: typer.Typer) -> None:
    for fn in (stats, config, topics, ping):
        app.command(name=fn.__name__)(fn)
