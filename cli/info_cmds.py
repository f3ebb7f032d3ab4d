"""The info commands: stats, config, topics, ping."""

from __future__ import annotations

import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Annotated

import typer

from logd_trio.client.client import Client
from logd_trio.core.defaults import DEFAULT_ADDRESS

from .errors import run
from .options import (
    HostOpt,
    RetriesOpt,
    Security,
    TimeoutOpt,
    TLSCAOpt,
    TLSCertOpt,
    TLSKeyOpt,
    TLSOpt,
    TokenOpt,
    VerboseOpt,
    connect_client,
)


def _info(command: str, host: str, retries: int, timeout: float | None, verbose: bool,
          call: Callable[[Client], Awaitable[str]], security: Security) -> None:
    async def main() -> None:
        async with connect_client(host, retries, timeout, security) as client:
            typer.echo(await call(client))

    run(command, main, verbose=verbose)


def stats(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
        verbose: VerboseOpt = False, tls: TLSOpt = False, tls_ca: TLSCAOpt = None, tls_cert: TLSCertOpt = None,
        tls_key: TLSKeyOpt = None, token: TokenOpt = None) -> None:
    """Print the server's counters."""

    async def call(c: Client) -> str:
        return "\n".join(f"{k}: {v}" for k, v in (await c.stats()).items())

    _info("stats", host, retries, timeout, verbose, call, Security(tls, tls_ca, tls_cert, tls_key, token))


def config(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
        verbose: VerboseOpt = False, tls: TLSOpt = False, tls_ca: TLSCAOpt = None, tls_cert: TLSCertOpt = None,
        tls_key: TLSKeyOpt = None, token: TokenOpt = None) -> None:
    """Print the server's configuration (CONFIG)."""

    async def call(c: Client) -> str:
        return "\n".join(f"{k}: {v}" for k, v in (await c.config()).fields.items())

    _info("config", host, retries, timeout, verbose, call, Security(tls, tls_ca, tls_cert, tls_key, token))


def topic_details(offsets: dict[str, tuple[int, int]], stats: dict[str, str]) -> list[dict[str, object]]:
    """One object per topic: TOPICS' offsets plus what STATS says of it (None where the server
    does not say: an older logd-trio)."""
    out: list[dict[str, object]] = []
    for name, (first, head) in sorted(offsets.items()):
        def number(key: str, name: str = name) -> int | None:
            value = stats.get(f"topic.{name}.{key}", "")
            return int(value) if value.isdigit() else None

        ms = number("last_append_ms")
        when = None if not ms else datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        out.append({"name": name, "first": first, "head": head, "bytes": number("bytes"),
                    "batches": number("batches"), "last_append": when, "last_append_ms": ms or None})
    return out


def topics(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
           verbose: VerboseOpt = False, tls: TLSOpt = False, tls_ca: TLSCAOpt = None, tls_cert: TLSCertOpt = None,
           tls_key: TLSKeyOpt = None, token: TokenOpt = None,
           as_json: Annotated[bool, typer.Option(
               "--json", help="A JSON array: name, first, head, bytes (on disk), batches, last_append (UTC) "
                              "per topic.")] = False) -> None:
    """List topics with their first and head offsets (logd-trio servers)."""

    async def call(c: Client) -> str:
        offsets = await c.topics()
        if as_json:
            return json.dumps(topic_details(offsets, await c.stats()))
        return "\n".join(f"{name}: {first} {head}" for name, (first, head) in offsets.items())

    _info("topics", host, retries, timeout, verbose, call, Security(tls, tls_ca, tls_cert, tls_key, token))


def ping(host: HostOpt = DEFAULT_ADDRESS, retries: RetriesOpt = 3, timeout: TimeoutOpt = None,
        verbose: VerboseOpt = False, tls: TLSOpt = False, tls_ca: TLSCAOpt = None, tls_cert: TLSCertOpt = None,
        tls_key: TLSKeyOpt = None, token: TokenOpt = None) -> None:
    """Check that the server answers; prints the round-trip time."""

    async def call(c: Client) -> str:
        rtt = await c.ping()
        return f"PONG from {c.address} in {rtt * 1000:.2f} ms"

    _info("ping", host, retries, timeout, verbose, call, Security(tls, tls_ca, tls_cert, tls_key, token))


def register(app: typer.Typer) -> None:
    for fn in (stats, config, topics, ping):
        app.command(name=fn.__name__)(fn)
