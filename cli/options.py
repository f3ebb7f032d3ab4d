"""Option types shared by the commands: one parser each for addresses and durations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated

import typer

from logd_trio.client.client import Client, RetryPolicy, open_client
from logd_trio.client.failover import find_leader, parse_hosts
from logd_trio.client.transport import check_topic
from logd_trio.core.addresses import AddressError, parse_address
from logd_trio.core.durations import DurationError, parse_duration
from logd_trio.core.errors import InvalidTopic


def check_host(value: str) -> str:
    """A ``HOST:PORT[,HOST:PORT...]`` flag (several: a cluster's nodes): checked here, so a bad one
    is a usage error."""
    try:
        for part in value.split(","):
            parse_address(part)
    except AddressError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def check_topic_name(value: str) -> str:
    """A ``--topic`` flag: a name no server accepts is a usage error, before connecting."""
    try:
        check_topic(value)
    except InvalidTopic as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def duration(text: str) -> float:
    """A duration flag (``0.4``, ``400ms``, ``2s``, ``1m30s``) in seconds."""
    try:
        return parse_duration(text, key="duration")
    except DurationError as exc:
        raise typer.BadParameter(str(exc).removeprefix("duration: ")) from None


def positive_duration(text: str) -> float:
    seconds = duration(text)
    if not seconds > 0:
        raise typer.BadParameter(f"{text!r}: must be above 0")
    return seconds


HostOpt = Annotated[
    str, typer.Option("--host", envvar="LOGD_HOST", callback=check_host,
                      help="Server address HOST:PORT; a cluster's nodes separated by commas (the leader is found).")
]
TopicOpt = Annotated[str, typer.Option("--topic", "-t", help="Topic name.", callback=check_topic_name)]
RetriesOpt = Annotated[
    int, typer.Option("--retries", min=1, help="Connection attempts before giving up (backoff between).")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", parser=positive_duration, metavar="DURATION",
                 help="Time to wait for each reply (write: for each acknowledgement), e.g. 5s; default: none."),
]


def connect_client(host: str, retries: int, timeout: float | None) -> AbstractAsyncContextManager[Client]:
    """The client every command uses: ``retries`` connection attempts, ``timeout`` per request.
    With several addresses (a cluster) it talks to the leader (found with CLUSTER)."""
    if "," in host:
        return _cluster_client(host, retries, timeout)
    return open_client(host, retry=RetryPolicy(attempts=retries, initial=0.1, maximum=1.0),
                       request_timeout=timeout)


@asynccontextmanager
async def _cluster_client(host: str, retries: int, request_timeout: float | None) -> AsyncIterator[Client]:
    hosts = parse_hosts(host)
    leader = await find_leader(hosts) or hosts[0]
    async with open_client(leader, retry=RetryPolicy(attempts=retries, initial=0.1, maximum=1.0),
                           request_timeout=request_timeout) as client:
        yield client
