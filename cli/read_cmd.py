"""``logd read``: messages of a topic to stdout."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from logd_trio.client.checkpoint import FileCheckpoint
from logd_trio.client.positions import END, parse_start
from logd_trio.core.defaults import DEFAULT_ADDRESS
from logd_trio.core.errors import NotFound
from logd_trio.core.replies import Message

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
    TopicOpt,
    VerboseOpt,
    connect_client,
)

# A template is tried on small and on large values: '{offset:c}' works for 0 only.
SAMPLES = ({"topic": "t", "offset": 0, "delta": 0, "body": ""},
           {"topic": "t" * 255, "offset": 1 << 62, "delta": 1 << 40, "body": "x" * 100})


def _check_format(value: str) -> str:
    if value in ("raw", "json"):
        return value
    if "{" not in value:
        raise typer.BadParameter("use raw, json or a template such as '{offset}:{delta} {body}'")
    try:
        for sample in SAMPLES:
            value.format(**sample)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise typer.BadParameter(f"bad template {value!r}: fields are {{topic}} {{offset}} {{delta}} {{body}} ({exc})"
                                 ) from None
    return value


def _check_start(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_start(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _format(msg: Message, fmt: str, numbers: bool) -> bytes:
    if fmt == "json":
        obj: dict[str, object] = {"topic": msg.topic, "offset": msg.offset, "delta": msg.delta}
        try:
            obj["body"] = msg.body.decode("utf-8")
        except UnicodeDecodeError:
            obj["body_base64"] = base64.b64encode(msg.body).decode("ascii")
        return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"
    if fmt != "raw":  # a template; bytes that are not UTF-8 pass through unchanged
        body = msg.body.decode("utf-8", "surrogateescape")
        try:
            line = fmt.format(topic=msg.topic, offset=msg.offset, delta=msg.delta, body=body)
        except (LookupError, AttributeError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"--format {fmt!r} cannot show the message at {msg.offset}:{msg.delta}: {exc}") from None
        return line.encode("utf-8", "surrogateescape") + b"\n"
    if numbers:
        return b"%d:%d\t%s\n" % (msg.offset, msg.delta, msg.body)
    return msg.body + b"\n"


def read(
    host: HostOpt = DEFAULT_ADDRESS,
    topic: TopicOpt = "default",
    offset: Annotated[str | None, typer.Option(
        "--offset", "-o", callback=_check_start, metavar="POSITION",
        help="Where to start: oldest, end, -N (the last N messages), OFFSET or OFFSET:DELTA (as -n prints).")] = None,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the oldest retained message (ignore a checkpoint).")
    ] = False,
    from_now: Annotated[
        bool, typer.Option("--from-now", help="Only messages written from now on (--offset end --follow).")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", "-l", min=0, help="Stop after N messages (0: no limit).")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep waiting for new messages.")] = False,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", "-c", help="Resume from and record progress in FILE.")
    ] = None,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", callback=_check_format,
        help="raw: one body per line; json: one object per line; or a template: '{offset}:{delta} {body}'.")] = "raw",
    numbers: Annotated[bool, typer.Option("--numbers", "-n", help="Prefix raw lines with OFFSET:DELTA.")] = False,
    retries: RetriesOpt = 3,
    timeout: TimeoutOpt = None,
    verbose: VerboseOpt = False,
    tls: TLSOpt = False,
    tls_ca: TLSCAOpt = None,
    tls_cert: TLSCertOpt = None,
    tls_key: TLSKeyOpt = None,
    token: TokenOpt = None,
) -> None:
    """Read messages, by default from the oldest retained one to the end of the log."""
    if sum((offset is not None, from_beginning, from_now)) > 1:
        raise typer.BadParameter("use one of --offset, --from-beginning and --from-now")
    start = END if from_now else parse_start(offset) if offset is not None else None
    follow = follow or from_now
    security = Security(tls, tls_ca, tls_cert, tls_key, token)
    out = sys.stdout.buffer

    async def main() -> None:
        async with connect_client(host, retries, timeout, security) as client:
            if await client.supports_extensions() and await client.head(topic) is None:
                if not follow:
                    raise NotFound(f"topic {topic!r} does not exist")
                typer.echo(f"logd read: waiting for topic {topic!r} to exist", err=True)
            cp = FileCheckpoint(checkpoint) if checkpoint else None
            async with client.scanner(topic, start=start, from_beginning=from_beginning, checkpoint=cp,
                                      limit=limit or None, follow=follow, read_size=5000) as scanner:
                async for msg in scanner:
                    out.write(_format(msg, fmt, numbers))
                    if follow:
                        out.flush()
        out.flush()

    run("read", main, verbose=verbose)


def register(app: typer.Typer) -> None:
    app.command(name="read")(read)
