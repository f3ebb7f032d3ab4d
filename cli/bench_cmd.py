"""``logd bench``: flags -> BenchConfig -> one call (Go's ``log-cli bench`` flags plus message size)."""

from __future__ import annotations

import json
from typing import Annotated

import trio
import typer

from logd_trio.server.config import parse_duration
from logd_trio.tools.bench import BenchConfig, BenchError, format_result, progress_stream, run_bench


def bench(
    host: Annotated[str, typer.Option(help="Server address, HOST:PORT.")] = "127.0.0.1:1774",
    conns: Annotated[int, typer.Option(help="Number of connections.")] = 1,
    topics: Annotated[int, typer.Option(
        help="Number of topics (benchmark_0 ...); connection i uses topic i mod topics.")] = 1,
    duration: Annotated[str, typer.Option(help="Length of each phase, Go duration such as 5s or 500ms.")] = "5s",
    size: Annotated[int, typer.Option(
        help="Bytes per BATCH request, line included (at most the server's max batch size).")] = 65500,
    message_size: Annotated[int, typer.Option(help="Bytes per message (Go's bench: 31).")] = 31,
    only_write: Annotated[bool, typer.Option("--only-write", help="Skip the read phase.")] = False,
    only_read: Annotated[bool, typer.Option(
        "--only-read", help="Skip the write phase; read topics an earlier bench wrote with the same sizes.")] = False,
    window: Annotated[int, typer.Option(help="Requests in flight per connection.")] = 32,
    read_batches: Annotated[int, typer.Option(help="Batches asked for per READ request.")] = 16,
    progress: Annotated[bool, typer.Option(
        "--progress", help="Live progress line on stderr even when it is not a terminal.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
) -> None:
    """Measure write and read throughput and latency with pipelined raw requests."""
    if only_write and only_read:
        typer.echo("logd bench: --only-write and --only-read exclude each other", err=True)
        raise typer.Exit(2)
    try:
        config = BenchConfig(host=host, conns=conns, topics=topics, duration=parse_duration(duration),
                             size=size, message_size=message_size, write=not only_read, read=not only_write,
                             window=window, read_batches=read_batches)
    except ValueError as e:  # ConfigError (bad duration) is a ValueError too
        typer.echo(f"logd bench: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        result = trio.run(lambda: run_bench(config, progress=progress_stream(progress)))
    except BenchError as e:
        typer.echo(f"logd bench: {e}", err=True)
        raise typer.Exit(1) from None
    except OSError as e:
        typer.echo(f"logd bench: {host}: {e.strerror or e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(result.as_dict()) if as_json else format_result(result))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
