"""Option types shared by the commands: one parser each for addresses and durations."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

import anyio
import typer

from logd_trio.client.client import Client, RetryPolicy, open_client
from logd_trio.client.failover import ClusterClient, Secure, parse_hosts
from logd_trio.client.transport import check_topic
from logd_trio.core.addresses import AddressError, parse_address
from logd_trio.core.durations import DurationError, parse_duration
from logd_trio.core.errors import InvalidTopic
from logd_trio.core.tls import TLSConfigError, client_context


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


TLSOpt = Annotated[bool, typer.Option(
    "--tls", envvar="LOGD_TLS", help="Connect with TLS, checking the server's certificate against the system's CAs "
    "(or --tls-ca).")]
TLSCAOpt = Annotated[str | None, typer.Option(
    "--tls-ca", envvar="LOGD_TLS_CA", metavar="FILE",
    help="CA certificate(s) (PEM) the server's certificate must be signed by; implies --tls.")]
TLSCertOpt = Annotated[str | None, typer.Option(
    "--tls-cert", envvar="LOGD_TLS_CERT", metavar="FILE",
    help="Client certificate (PEM) for servers that require one (mutual TLS); implies --tls.")]
TLSKeyOpt = Annotated[str | None, typer.Option(
    "--tls-key", envvar="LOGD_TLS_KEY", metavar="FILE", help="The client certificate's private key (PEM).")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", envvar="LOGD_TOKEN", metavar="TOKEN",
    help="Authenticate with this token (AUTH); prefer $LOGD_TOKEN, as other users can see a flag.")]


@dataclass(frozen=True)
class Security:
    """The TLS and token flags of a client command; the TLS context is built (and a bad file
    reported as a usage error) when the flags are collected, before anything connects."""

    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str | None = None
    context: ssl.SSLContext | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.tls or self.ca or self.cert or self.key:
            try:
                object.__setattr__(self, "context", client_context(self.ca, self.cert, self.key))
            except TLSConfigError as exc:
                raise typer.BadParameter(str(exc)) from None


PLAINTEXT = Security()


def connect_client(host: str, retries: int, timeout: float | None,
                   security: Security = PLAINTEXT) -> AbstractAsyncContextManager[Client]:
    """The client every command uses: ``retries`` connection attempts, ``timeout`` per request,
    TLS and a token as the flags say.  With several addresses (a cluster) it talks to the
    leader (found with CLUSTER), or a member when there is none, and moves to another node when
    its connection breaks (a reader resumes there)."""
    if "," in host:
        return _cluster_client(host, retries, timeout, security)
    return open_client(host, retry=RetryPolicy(attempts=retries, initial=0.1, maximum=1.0),
                       request_timeout=timeout, ssl_context=security.context, token=security.token)


def cluster_security(security: Security) -> Secure:
    """How the cluster clients connect to every node: the TLS context and token of the flags."""
    return Secure(security.context, security.token)


@asynccontextmanager
async def _cluster_client(host: str, retries: int, request_timeout: float | None,
                          security: Security) -> AsyncIterator[Client]:
    client = ClusterClient(parse_hosts(host), secure=cluster_security(security),
                           retry=RetryPolicy(attempts=retries, initial=0.1, maximum=1.0),
                           request_timeout=request_timeout)
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()
