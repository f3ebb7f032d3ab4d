"""``logd bench``: flags -> BenchConfig -> one call (Go's ``log-cli bench`` flags plus message size)."""

from __future__ import annotations

import json
from typing import Annotated

import trio
import typer

from logd_trio.core.defaults import DEFAULT_ADDRESS
from logd_trio.tools.bench import BenchConfig, BenchResult, format_result, progress_stream, run_bench
from logd_trio.tools.bench_cleanup import delete_topics, existing_topics

from .errors import fail, run
from .options import Security, TLSCAOpt, TLSCertOpt, TLSKeyOpt, TLSOpt, TokenOpt, check_host, duration


def bench(
    host: Annotated[str, typer.Option(help="Server address, HOST:PORT.", callback=check_host)] = DEFAULT_ADDRESS,
    conns: Annotated[int, typer.Option(help="Number of connections.")] = 1,
    topics: Annotated[int, typer.Option(
        help="Number of topics (PREFIX0 ...); connection i uses topic i mod topics.")] = 1,
    topic_prefix: Annotated[str, typer.Option(
        help="Names of the bench topics: PREFIX0, PREFIX1, ... (Go's bench: benchmark_).")] = "benchmark_",
    keep: Annotated[bool, typer.Option(
        "--keep", help="Leave the topics the run created (for a later --only-read); by default they are "
                       "deleted at the end (logd-trio servers; topics that existed before are never deleted).")]
        = False,
    seconds: Annotated[float, typer.Option("--duration", parser=duration, metavar="DURATION",
                                           help="Length of each phase, such as 5s or 500ms.")] = 5.0,
    size: Annotated[int, typer.Option(
        help="Bytes per BATCH request, line included (at most the server's max batch size).")] = 65500,
    message_size: Annotated[int, typer.Option(help="Bytes per message (Go's bench: 31).")] = 31,
    only_write: Annotated[bool, typer.Option("--only-write", help="Skip the read phase.")] = False,
    only_read: Annotated[bool, typer.Option(
        "--only-read", help="Skip the write phase; read topics an earlier bench wrote with the same sizes.")] = False,
    in_flight: Annotated[int, typer.Option(
        "--in-flight", "--window", metavar="N",
        help="Requests in flight per connection; 1: send one and wait for its reply, as Go's log-cli bench "
             "and most clients do (--window is the old name).")] = 32,
    read_batches: Annotated[int | None, typer.Option(
        help="Batches asked for per READ request [16; 1 with --in-flight 1].")] = None,
    progress: Annotated[bool, typer.Option(
        "--progress", help="Live progress line on stderr even when it is not a terminal.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
    tls: TLSOpt = False,
    tls_ca: TLSCAOpt = None,
    tls_cert: TLSCertOpt = None,
    tls_key: TLSKeyOpt = None,
    token: TokenOpt = None,
) -> None:
    """Measure write and read throughput and latency with raw requests, pipelined or one at a time."""
    if in_flight < 1:
        typer.echo(f"logd bench: --in-flight must be at least 1, got {in_flight}", err=True)
        raise typer.Exit(2)
    if read_batches is not None and read_batches < 1:
        typer.echo(f"logd bench: --read-batches must be at least 1, got {read_batches}", err=True)
        raise typer.Exit(2)
    if only_write and only_read:
        typer.echo("logd bench: --only-write and --only-read exclude each other", err=True)
        raise typer.Exit(2)
    security = Security(tls, tls_ca, tls_cert, tls_key, token)
    try:
        config = BenchConfig(host=host, conns=conns, topics=topics, duration=seconds, size=size,
                             message_size=message_size, write=not only_read, read=not only_write,
                             in_flight=in_flight, read_batches=read_batches or 0, topic_prefix=topic_prefix,
                             ssl_context=security.context, token=security.token)
    except ValueError as e:
        fail("bench", e)
    results: list[BenchResult] = []
    deleted: list[str] = []

    async def main() -> None:
        before = await existing_topics(config.address) if config.write and not keep else None
        try:
            results.append(await run_bench(config, progress=progress_stream(progress)))
        finally:
            if before is not None:  # also after a failed or interrupted run
                with trio.CancelScope(shield=True):
                    created = {config.topic(i) for i in range(config.topics)} - before
                    deleted.extend(await delete_topics(config.address, created))

    run("bench", main)
    result = results[0]
    if as_json:
        typer.echo(json.dumps(result.as_dict() | {"deleted_topics": deleted}))
    else:
        typer.echo(format_result(result))
        if deleted:
            typer.echo(f"deleted the bench topics: {', '.join(deleted)} (--keep leaves them)")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
