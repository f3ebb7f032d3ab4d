"""The client's transport layer: connections, retries, deadlines and request sessions.

Everything here runs on anyio, so it works under ``trio.run`` and ``asyncio.run``
alike.  :mod:`logd_trio.client.writer` and :mod:`logd_trio.client.scanner` build on
this module and on :class:`ClientLike` (what they need of a client), never on
:mod:`logd_trio.client.client`, which imports them.

Two boundaries, one place each:

* transport errors (``OSError``, anyio's broken/closed resource errors, EOF)
  become :class:`~logd_trio.core.errors.ConnectionLost` inside :class:`Connection`;
* a deadline that passes becomes :class:`~logd_trio.core.errors.Timeout` in
  :func:`deadline`.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.abc
import anyio.lowlevel
import trio.lowlevel
from anyio.streams.tls import TLSStream
from trio.lowlevel import enable_ki_protection

from logd_trio.client.connection import Connection
from logd_trio.core.addresses import format_address, parse_address
from logd_trio.core.defaults import DEFAULT_MAX_REPLY
from logd_trio.core.errors import BadReply, ConnectionLost, InvalidTopic, Timeout, Unsupported, unwrap_group
from logd_trio.core.framing import valid_topic
from logd_trio.core.replies import ErrorReply, Reply, ReplyKind
from logd_trio.core.tls import TLSFailed, describe

__all__ = [
    "ClientLike",
    "Connection",
    "RetryPolicy",
    "FollowsLeader",
    "Session",
    "TLSTimeout",
    "authenticate",
    "check_topic",
    "raise_leaf",
    "connect",
    "deadline",
    "ki_protected",
]

_F = TypeVar("_F", bound=Callable[..., object])


class TLSTimeout(TLSFailed):
    """No TLS handshake within the connect timeout: a server without TLS, or a node that does not
    run (paused, partitioned).  One server: final as any TLSFailed; a cluster client tries another node."""


def ki_protected(fn: _F) -> _F:
    """Under Trio, Ctrl-C is raised at the caller's next checkpoint instead of inside ``fn``
    (it never leaves a batch half built).  Inert under asyncio, whose Ctrl-C is a cancellation."""
    return enable_ki_protection(fn)



@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How connecting retries: ``attempts`` tries in all, sleeping ``initial``,
    then ``initial * multiplier``, ... (at most ``maximum``) between them.  An attempt
    that takes longer than ``connect_timeout`` seconds (a host that drops the SYN) fails."""

    attempts: int = 10
    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.initial < 0 or self.maximum < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy delays must be >= 0 and multiplier >= 1")
        if not self.connect_timeout > 0:
            raise ValueError("RetryPolicy.connect_timeout must be > 0")

    def delays(self) -> Iterator[float]:
        """The sleeps between attempts (``attempts - 1`` of them)."""
        delay = self.initial
        for _ in range(self.attempts - 1):
            yield min(delay, self.maximum)
            delay *= self.multiplier


def fast_checkpoint_if_cancelled() -> Callable[[], Awaitable[None]]:
    """The cheapest "raise if cancelled" for the running loop (per-message paths): Trio's own
    under Trio, saving anyio's backend lookup per call."""
    if trio.lowlevel.in_trio_run():
        return trio.lowlevel.checkpoint_if_cancelled
    return anyio.lowlevel.checkpoint_if_cancelled


def check_topic(topic: str) -> bytes:
    """The topic's wire bytes; :class:`InvalidTopic` for a name no server accepts."""
    raw = topic.encode("ascii", "replace")
    if not valid_topic(raw):
        raise InvalidTopic(f"invalid topic name {topic!r}: use 1..255 of [A-Za-z0-9._-]")
    return raw


async def connect(address: str, *, retry: RetryPolicy, max_reply: int = DEFAULT_MAX_REPLY,
                  ssl_context: ssl.SSLContext | None = None, tls_hostname: str | None = None) -> Connection:
    """Open a connection, retrying with backoff; :class:`ConnectionLost` when all attempts fail.

    With ``ssl_context`` the connection is TLS; the server's certificate must name
    ``tls_hostname`` (default: the address's host).  A failed handshake raises
    :class:`~logd_trio.core.tls.TLSFailed` at once (a retry would fail the same way); the
    handshake counts in ``retry.connect_timeout``.
    """
    host, port = parse_address(address)
    where = format_address(host, port)
    delays = retry.delays()
    while True:
        try:
            try:
                with anyio.fail_after(retry.connect_timeout):
                    stream = await anyio.connect_tcp(host, port)  # sets TCP_NODELAY
            except TimeoutError:
                raise OSError(f"no answer within {retry.connect_timeout:g} s") from None
        except OSError as exc:
            delay = next(delays, None)
            if delay is None:
                raise ConnectionLost(
                    f"cannot connect to {where} ({retry.attempts} attempts): {_why(exc)}"
                ) from exc
            await anyio.sleep(delay)
            continue
        if ssl_context is None:
            return Connection(stream, address=where, max_reply=max_reply)
        return Connection(await _handshake(stream, where, ssl_context, tls_hostname or host, retry.connect_timeout),
                          address=where, max_reply=max_reply)


async def _handshake(stream: anyio.abc.SocketStream, where: str, ctx: ssl.SSLContext, hostname: str,
                     seconds: float) -> TLSStream:
    """TLS over a connected ``stream``, within ``seconds``; :class:`TLSFailed` (not retried) otherwise."""
    try:
        with anyio.fail_after(seconds):
            # The server closes without close_notify: its EOF is the end (replies are length-delimited).
            return await TLSStream.wrap(stream, server_side=False, hostname=hostname, ssl_context=ctx,
                                        standard_compatible=False)
    except BaseException as exc:
        await anyio.aclose_forcefully(stream)
        if isinstance(exc, TimeoutError):
            raise TLSTimeout(f"cannot connect to {where}: no TLS handshake within {seconds:g} s "
                             "(a server without TLS, or one that does not run?)") from None
        if isinstance(exc, ssl.SSLError):
            why = f"TLS handshake failed: {describe(exc)}"
        elif isinstance(exc, anyio.BrokenResourceError | anyio.EndOfStream | OSError):
            why = (f"the server closed the connection during the TLS handshake ({describe(exc)}; does it "
                   "require a client certificate, or not trust this one?)")
        else:
            raise
    raise TLSFailed(f"cannot connect to {where}: {why}")


async def authenticate(conn: Connection, token: str) -> None:
    """``AUTH <token>`` on a new connection (a logd-trio extension); raises
    :class:`~logd_trio.core.errors.NotAllowed` when the server does not know the token.
    The connection is closed on any failure."""
    if not token or not token.isascii() or any(c.isspace() for c in token):
        await conn.aclose()
        raise ValueError("a token is printable ASCII without spaces")
    try:
        await conn.send(b"AUTH %s\r\n" % token.encode("ascii"))
        reply = await conn.receive(ReplyKind.OK)
    except BaseException:
        await conn.aclose()
        raise
    if isinstance(reply, ErrorReply):
        await conn.aclose()
        if reply.reason in ("unknown command", "invalid request"):
            raise Unsupported(f"{conn.address} does not support AUTH (a logd-trio extension): "
                              "connect without a token") from None
        raise reply.exception()


def _why(exc: OSError) -> str:
    """The reason of a failed connect (anyio groups the attempts of every address it tried)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        cause = next((e for e in cause.exceptions if isinstance(e, OSError)), None)
    if isinstance(cause, OSError):
        exc = cause
    return exc.strerror or str(exc)


def raise_leaf(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the one exception to show for a task group's ``group`` (see
    :func:`~logd_trio.core.errors.unwrap_group`), with its own ``__cause__`` and ``__context__``
    as the code that raised it left them (not the group's)."""
    exc = unwrap_group(group, skip=(anyio.get_cancelled_exc_class(),))
    cause, context, suppress = exc.__cause__, exc.__context__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__cause__, exc.__context__, exc.__suppress_context__ = cause, context, suppress


@contextmanager
def deadline(seconds: float | None, what: str = "no reply") -> Iterator[None]:
    """``seconds`` for the block (``None``: no limit); :class:`Timeout` when they pass."""
    if seconds is None:
        yield
        return
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise Timeout(f"{what} within {seconds:g} s") from None


class ClientLike(Protocol):
    """What a writer and a scanner need of a client (:class:`logd_trio.client.client.Client` is one)."""

    @property
    def max_reply(self) -> int: ...

    @property
    def request_timeout(self) -> float | None: ...

    async def connect(self) -> Connection: ...

    def session(self) -> Session: ...

    async def max_batch_size(self) -> int: ...

    async def supports_extensions(self) -> bool: ...

    async def topics(self) -> dict[str, tuple[int, int]]: ...


@runtime_checkable
class FollowsLeader(Protocol):
    """A client of several nodes: a following reader's session reads from the leader only and
    moves with it; ``settle``: how long that reader waits for a position a new leader does not
    serve yet (see :mod:`logd_trio.client.scanner`)."""

    settle: float

    def following_session(self) -> Session: ...

    async def head_on(self, session: Session, topic: str) -> int: ...


class Connector(Protocol):
    """What a :class:`Session` needs: new connections and the per-request timeout."""

    @property
    def request_timeout(self) -> float | None: ...

    async def connect(self) -> Connection: ...


class Session:
    """Serialised request/reply on one (re)connectable connection, shared by tasks."""

    def __init__(self, connector: Connector) -> None:
        self._connector = connector
        self._conn: Connection | None = None
        self._lock = anyio.Lock()

    async def request(
        self, data: bytes, kind: ReplyKind, *, idempotent: bool = True, extra_time: float = 0.0
    ) -> Reply:
        """Send ``data``, return its reply (an ``ErrorReply`` is returned, not raised)."""
        timeout = self._connector.request_timeout
        async with self._lock:
            with deadline(None if timeout is None else timeout + extra_time):
                return await self._request(data, kind, idempotent)

    async def _request(self, data: bytes, kind: ReplyKind, idempotent: bool) -> Reply:
        for attempt in (1, 2):
            conn = self._conn
            if conn is None or conn.is_stale():
                if conn is not None:
                    await conn.aclose()
                self._conn = None
                conn = self._conn = await self._connector.connect()
            try:
                await conn.send(data)
                return await conn.receive(kind)
            except ConnectionLost as exc:
                await self.aclose()
                if attempt == 2 or not idempotent or isinstance(exc, BadReply | TLSFailed):
                    raise
            except BaseException:
                await self.aclose()  # cancelled or failed mid-request: the reply stream is out of step
                raise
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()
