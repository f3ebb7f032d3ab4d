"""``logd read``: messages of a topic to stdout."""

from __future__ import annotations

import base64
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from logd_trio.client.checkpoint import FileCheckpoint
from logd_trio.core.defaults import DEFAULT_ADDRESS
from logd_trio.core.replies import Message

from .errors import run
from .options import HostOpt, RetriesOpt, TimeoutOpt, TopicOpt, VerboseOpt, connect_client


class Format(StrEnum):
    raw = "raw"
    json = "json"


def _format(msg: Message, fmt: Format, numbers: bool) -> bytes:
    if fmt is Format.json:
        obj: dict[str, object] = {"topic": msg.topic, "offset": msg.offset, "delta": msg.delta}
        try:
            obj["body"] = msg.body.decode("utf-8")
        except UnicodeDecodeError:
            obj["body_base64"] = base64.b64encode(msg.body).decode("ascii")
        return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"
    if numbers:
        return b"%d:%d\t%s\n" % (msg.offset, msg.delta, msg.body)
    return msg.body + b"\n"


def read(
    host: HostOpt = DEFAULT_ADDRESS,
    topic: TopicOpt = "default",
    offset: Annotated[int | None, typer.Option("--offset", "-o", min=0, help="Start at this batch offset.")] = None,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the oldest retained message (ignore a checkpoint).")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", "-l", min=0, help="Stop after N messages (0: no limit).")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep waiting for new messages.")] = False,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", "-c", help="Resume from and record progress in FILE.")
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="raw: one body per line; json: one object.")] = (
        Format.raw
    ),
    numbers: Annotated[bool, typer.Option("--numbers", "-n", help="Prefix raw lines with OFFSET:DELTA.")] = False,
    retries: RetriesOpt = 3,
    timeout: TimeoutOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Read messages, by default from the oldest retained one to the end of the log."""
    if offset is not None and from_beginning:
        raise typer.BadParameter("use either --offset or --from-beginning")
    out = sys.stdout.buffer

    async def main() -> None:
        async with connect_client(host, retries, timeout) as client:
            cp = FileCheckpoint(checkpoint) if checkpoint else None
            async with client.scanner(topic, offset=offset, from_beginning=from_beginning, checkpoint=cp,
                                      limit=limit or None, follow=follow, read_size=5000) as scanner:
                async for msg in scanner:
                    out.write(_format(msg, fmt, numbers))
                    if follow:
                        out.flush()
        out.flush()

    run("read", main, verbose=verbose)




def register(app: typer.Typer) -> None:
    app.command(name="read")(read)
