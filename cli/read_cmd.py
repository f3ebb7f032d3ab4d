"""``logd read``: messages of a topic to stdout."""

from __future__ import annotations

import base64
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from logd_trio.client.checkpoint import FileCheckpoint, Position
from logd_trio.client.client import Client
from logd_trio.client.positions import END, StartAt, parse_start
from logd_trio.core.defaults import DEFAULT_ADDRESS
from logd_trio.core.durations import DurationError, parse_duration
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


def parse_time(text: str) -> datetime.datetime:
    """``2026-12-01T10:00:00Z`` (ISO 8601 with a zone: ``Z`` or ``+01:00``).  Raises ValueError."""
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use ISO 8601 such as 2026-12-01T10:00:00Z") from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone: add Z for UTC or an offset such as +01:00")
    if when.timestamp() < 0:
        raise ValueError(f"{text!r} is before 1970")
    return when


def _check_start(value: str | None) -> str | None:
    if value is not None:
        try:
            if value.startswith("@"):
                parse_time(value[1:])
            else:
                parse_start(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _check_since(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_duration(value, key="--since")
        except DurationError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


async def _seek(client: Client, topic: str, when: datetime.datetime | float) -> StartAt | None:
    """Where the first batch at or after ``when`` starts (SEEK); the oldest of a topic not there yet."""
    try:
        return Position(await client.seek(topic, when), 0)
    except NotFound:
        return None


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
        help="Where to start: oldest, end, -N (the last N messages), OFFSET or OFFSET:DELTA (as -n prints), or "
             "@TIME: the first batch written at or after TIME (ISO 8601 with a zone, 2026-12-01T10:00:00Z).")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", callback=_check_since, metavar="DURATION",
        help="Start at the first batch written in the last DURATION (10m, 2h, 7d), by this machine's clock "
             "(the server stamps batches by its own: a skew between them moves the start by as much).")] = None,
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
    if sum((offset is not None, from_beginning, from_now, since is not None)) > 1:
        raise typer.BadParameter("use one of --offset, --since, --from-beginning and --from-now")
    when: datetime.datetime | float | None = None
    if since is not None:  # (longer than since 1970: everything)
        when = max(time.time() - parse_duration(since), 0.0)
    elif offset is not None and offset.startswith("@"):
        when = parse_time(offset[1:])
    start = END if from_now else parse_start(offset) if offset is not None and when is None else None
    follow = follow or from_now
    security = Security(tls, tls_ca, tls_cert, tls_key, token)
    out = sys.stdout.buffer

    async def main() -> None:
        async with connect_client(host, retries, timeout, security) as client:
            if await client.supports_extensions() and await client.head(topic) is None:
                if not follow:
                    raise NotFound(f"topic {topic!r} does not exist")
                typer.echo(f"logd read: waiting for topic {topic!r} to exist", err=True)
            begin = start if when is None else await _seek(client, topic, when)
            cp = FileCheckpoint(checkpoint) if checkpoint else None
            async with client.scanner(topic, start=begin, from_beginning=from_beginning, checkpoint=cp,
                                      limit=limit or None, follow=follow, read_size=5000) as scanner:
                async for msg in scanner:
                    out.write(_format(msg, fmt, numbers))
                    if follow:
                        out.flush()
        out.flush()

    run("read", main, verbose=verbose)


def register(app: typer.Typer) -> None:
    app.command(name="read")(read)
