"""anyio client for logd servers (logd-trio or Go logd); runs under Trio and asyncio.

``open_client("host:port")`` gives a :class:`Client`; its request methods send
one request on the client's own connection and return the parsed reply.
:meth:`Client.writer` and :meth:`Client.scanner` open connections of their own.
Connections, retries and deadlines live in :mod:`logd_trio.client.transport`;
``ERR <reason>`` becomes a typed :class:`~logd_trio.core.errors.ClientError` in
:func:`logd_trio.core.replies.error_for_reason`.

Timeouts belong to the caller: wrap calls in ``anyio.fail_after`` (or
``trio.fail_after``) as usual.  A ``request_timeout`` given to :func:`open_client`
is applied once per request (connecting included) and raises
:class:`~logd_trio.core.errors.Timeout`.

Retries: connecting retries with exponential backoff (:class:`RetryPolicy`).
A request that does not change the log (READ, TAIL, STATS, CONFIG, TOPICS,
PING) is sent once more on a new connection when the old one turns out to be
broken (not after :class:`~logd_trio.core.errors.BadReply`: a server that sends
bytes that are not a reply is not asked again).  A BATCH is never re-sent by the
client: if the connection breaks after it was sent,
:class:`~logd_trio.core.errors.ConnectionLost` is raised and the batch may or may
not have been stored (the caller decides whether to retry, accepting a possible
duplicate: at-least-once).

Cancellation: cancelling a request while it waits for its reply closes that
connection (its reply stream is no longer in step with its requests); the next
request opens a new one.  Whether a cancelled BATCH was stored is unknown.
"""

from __future__ import annotations

import datetime
import os
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Unpack

import anyio

from logd_trio.client.positions import Last
from logd_trio.client.scanner import Scanner, ScannerOptions
from logd_trio.client.transport import (
    Connection,
    RetryPolicy,
    Session,
    authenticate,
    check_topic,
    connect,
    deadline,
)
from logd_trio.client.writer import Writer, WriterOptions, open_writer
from logd_trio.core.addresses import format_address, parse_address
from logd_trio.core.defaults import DEFAULT_ADDRESS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_REPLY
from logd_trio.core.errors import BadReply, ConnectionLost, MessageTooLarge, NotFound, Unsupported
from logd_trio.core.framing import build_body, build_frame
from logd_trio.core.replies import (
    ErrorReply,
    Message,
    MokReply,
    OffsetReply,
    PongReply,
    ReadReply,
    Reply,
    ReplyKind,
)
from logd_trio.core.requests import encode_read, encode_seek, encode_tail

__all__ = [
    "DEFAULT_ADDRESS",
    "Client",
    "Connection",
    "Message",
    "ReadReply",
    "RetryPolicy",
    "ServerInfo",
    "open_client",
    "parse_address",
]


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The server's CONFIG reply."""

    fields: dict[str, str]

    @property
    def max_batch_size(self) -> int:
        value = self.fields.get("MaxBatchSize", "")
        return int(value) if value.isdigit() else DEFAULT_MAX_BATCH_SIZE

    @property
    def host(self) -> str:
        return self.fields.get("Host", "")


def _raise_if_error(reply: Reply) -> None:
    if isinstance(reply, ErrorReply):
        raise reply.exception()


class Client:
    """A connection-managing logd client.  Create it with :func:`open_client`."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        retry: RetryPolicy | None = None,
        request_timeout: float | None = None,
        max_reply: int = DEFAULT_MAX_REPLY,
        extensions: bool | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
        token: str | None = None,
    ) -> None:
        self.address = format_address(*parse_address(address))
        self.ssl_context = ssl_context  # TLS on every connection when set
        self.tls_hostname = tls_hostname
        self.token = token or None  # sent with AUTH on every new connection when set
        self.retry = retry or RetryPolicy()
        self.request_timeout = request_timeout
        self.max_reply = max_reply
        self.server_info: ServerInfo | None = None
        self._extensions = extensions  # None: probe the server once
        self._session = Session(self)

    # ------------------------------------------------------------ plumbing

    async def connect(self) -> Connection:
        """A new connection to the server (retrying per :attr:`retry`)."""
        conn = await connect(self.address, retry=self.retry, max_reply=self.max_reply,
                             ssl_context=self.ssl_context, tls_hostname=self.tls_hostname)
        if self.token is not None:
            await authenticate(conn, self.token)
        return conn

    def session(self) -> Session:
        """A new request/reply session with its own connection."""
        return Session(self)

    async def aclose(self) -> None:
        """Close the client's connection.  Idempotent; writers and scanners close their own."""
        await self._session.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ requests

    async def batch(self, topic: str, messages: Iterable[bytes]) -> int:
        """Write one batch; returns the offset where it begins.  Never re-sent (see module doc).

        :class:`~logd_trio.core.errors.MessageTooLarge` (nothing sent) when the request would be
        larger than the server's ``MaxBatchSize``.
        """
        msgs = [bytes(m) for m in messages]
        if not msgs:
            raise ValueError("a batch needs at least one message")
        request = build_frame(check_topic(topic), build_body(msgs), len(msgs))
        limit = await self.max_batch_size()
        if len(request) > limit:
            raise MessageTooLarge(
                f"a batch of {len(msgs)} message(s) takes {len(request)} bytes; the server accepts at most {limit}"
            )
        reply = await self._session.request(request, ReplyKind.OFFSET, idempotent=False)
        _raise_if_error(reply)
        assert isinstance(reply, OffsetReply)
        return reply.offset

    async def read(self, topic: str, offset: int, limit: int = 1000, *, wait_ms: int | None = None) -> ReadReply:
        """READ: the batch at ``offset`` and the ones after it while fewer than ``limit`` messages.

        ``wait_ms`` uses the long-poll extension (logd-trio only): at the head, the
        server waits that long for a batch.  ``NotFound`` when nothing is there.
        """
        check_topic(topic)
        extra = (wait_ms or 0) / 1000
        reply = await self._session.request(encode_read(topic, offset, limit, wait_ms), ReplyKind.READ,
                                            extra_time=extra)
        _raise_if_error(reply)
        assert isinstance(reply, ReadReply)
        return reply

    async def read_oldest(self, topic: str, limit: int = 1000) -> ReadReply:
        """TAIL: like :meth:`read` from the oldest retained batch (the protocol's TAIL request)."""
        check_topic(topic)
        reply = await self._session.request(encode_tail(topic, limit), ReplyKind.READ)
        _raise_if_error(reply)
        assert isinstance(reply, ReadReply)
        return reply

    async def tail(self, topic: str, n: int = 10) -> list[Message]:
        """The last ``n`` messages of ``topic`` (fewer if it has fewer; ``[]`` for an empty or
        unknown topic).  Reads the retained log once to find where they start."""
        async with self.scanner(topic, start=Last(n), limit=n) as s:
            return [m async for m in s]

    async def _mok(self, command: bytes) -> MokReply:
        reply = await self._session.request(command, ReplyKind.MOK)
        _raise_if_error(reply)
        assert isinstance(reply, MokReply)
        return reply

    async def config(self) -> ServerInfo:
        """CONFIG (cached in :attr:`server_info`)."""
        info = ServerInfo((await self._mok(b"CONFIG\r\n")).fields())
        self.server_info = info
        return info

    async def max_batch_size(self) -> int:
        """The server's ``MaxBatchSize`` (CONFIG, asked once; 65536 if it does not say)."""
        if self.server_info is None:
            await self.config()
        assert self.server_info is not None
        return self.server_info.max_batch_size

    async def stats(self) -> dict[str, str]:
        """STATS as a dict of strings (``"requests.total": "12"``...)."""
        return (await self._mok(b"STATS\r\n")).fields()

    async def topics(self) -> dict[str, tuple[int, int]]:
        """TOPICS extension: ``{topic: (first offset, head offset)}``.  :class:`Unsupported` on Go logd."""
        if not await self.supports_extensions():
            raise Unsupported("the server does not support TOPICS (a logd-trio extension)")
        out: dict[str, tuple[int, int]] = {}
        for name, value in (await self._mok(b"TOPICS\r\n")).fields().items():
            words = value.split()
            if len(words) == 2 and words[0].isdigit() and words[1].isdigit():
                out[name] = (int(words[0]), int(words[1]))
        return out

    async def delete_topic(self, topic: str) -> None:
        """DELETE extension: remove ``topic`` and its data.  ``NotFound`` for an unknown topic;
        :class:`Unsupported` on Go logd.  Never re-sent on another connection."""
        if not await self.supports_extensions():
            raise Unsupported("the server does not support DELETE (a logd-trio extension)")
        reply = await self._session.request(b"DELETE %s\r\n" % check_topic(topic), ReplyKind.OK,
                                            idempotent=False)
        _raise_if_error(reply)

    async def seek(self, topic: str, when: datetime.datetime | float) -> int:
        """SEEK extension: the offset of the first batch of ``topic`` the server appended at or after
        ``when`` (an aware datetime, or Unix time in seconds as ``time.time()`` gives); the head when
        there is none.  Batches whose time the server does not know (written by an older release or
        by Go logd) count as late as their partition's last write, so the answer may start a little
        early, never late.  ``NotFound`` for an unknown topic; :class:`Unsupported` on Go logd."""
        if isinstance(when, datetime.datetime):
            if when.tzinfo is None:
                raise ValueError("seek: a datetime needs a time zone (datetime.timezone.utc, or astimezone())")
            seconds = when.timestamp()
        else:
            seconds = float(when)
        if not 0 <= seconds < 2**53 / 1000:
            raise ValueError(f"seek: {when!r} is not a time after 1970")
        check_topic(topic)
        if not await self.supports_extensions():
            raise Unsupported("the server does not support SEEK (a logd-trio extension)")
        reply = await self._session.request(encode_seek(topic, int(seconds * 1000)), ReplyKind.SEEK)
        _raise_if_error(reply)
        assert isinstance(reply, OffsetReply)
        return reply.offset

    async def ping(self) -> float:
        """Round-trip time in seconds (PING, or CONFIG on servers without the extension)."""
        ext = await self.supports_extensions()
        start = anyio.current_time()
        if ext:
            reply = await self._session.request(b"PING\r\n", ReplyKind.PONG)
            _raise_if_error(reply)
        else:
            await self._mok(b"CONFIG\r\n")
        return anyio.current_time() - start

    async def supports_extensions(self) -> bool:
        """Whether the server speaks PROTOCOL.md Part 3 (probed once, on a fresh connection).

        The probe sends CONFIG and, once it is answered, PING.  ``PONG`` means yes;
        an ``ERR`` or another reply means no; Go logd answers an unknown command by
        closing the connection, which means no when it happens twice in a row right
        after CONFIG was answered.  Only such definite answers are cached: if the
        connection is lost before CONFIG is answered, :class:`ConnectionLost` is
        raised and the next call probes again.
        """
        if self._extensions is None:
            with deadline(self.request_timeout):
                answer = await self._probe()
                if answer is None:  # closed after PING: Go's "no", or a drop at a bad moment
                    answer = await self._probe()
            self._extensions = bool(answer)
        return self._extensions

    async def _probe(self) -> bool | None:
        """One probe: True/False, or None when the connection closed after CONFIG was answered."""
        conn = await self.connect()
        try:
            await conn.send(b"CONFIG\r\n")
            reply = await conn.receive(ReplyKind.MOK)  # ConnectionLost here: not an answer
            if isinstance(reply, MokReply):
                self.server_info = ServerInfo(reply.fields())
            try:
                with anyio.move_on_after(10):
                    await conn.send(b"PING\r\n")
                    return isinstance(await conn.receive(ReplyKind.PONG), PongReply)
                return False  # it answers CONFIG but not PING
            except BadReply:
                return False
            except ConnectionLost:
                return None
        finally:
            await conn.aclose()

    async def oldest(self, topic: str) -> int | None:
        """Offset of the oldest retained batch of ``topic``; ``None`` if it has none."""
        try:
            return (await self.read_oldest(topic, 1)).offset
        except NotFound:
            return None

    async def head(self, topic: str) -> int | None:
        """The next offset to be written (TOPICS extension); ``None`` for a topic the server
        does not have, or when the server lacks the extension (Go logd)."""
        if not await self.supports_extensions():
            return None
        entry = (await self.topics()).get(topic)
        return None if entry is None else entry[1]

    # ------------------------------------------------------------ helpers

    def writer(self, topic: str, **options: Unpack[WriterOptions]) -> AbstractAsyncContextManager[Writer]:
        """``async with client.writer(topic, ...) as w``: see :class:`logd_trio.client.writer.Writer`."""
        return open_writer(self, topic, **options)

    def scanner(self, topic: str, **options: Unpack[ScannerOptions]) -> Scanner:
        """``async with client.scanner(topic, ...) as s``: see :class:`logd_trio.client.scanner.Scanner`."""
        return Scanner(self, topic, **options)


@asynccontextmanager
async def open_client(
    address: str | None = None,
    *,
    retry: RetryPolicy | None = None,
    request_timeout: float | None = None,
    max_reply: int = DEFAULT_MAX_REPLY,
    extensions: bool | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tls_hostname: str | None = None,
    token: str | None = None,
) -> AsyncIterator[Client]:
    """``async with open_client("host:port") as client``.  ``address`` defaults to
    ``$LOGD_HOST`` or ``127.0.0.1:1774``.  Connects lazily, on the first request.

    ``extensions``: whether the server speaks logd-trio's extensions (long-poll
    READ, TOPICS, PING); ``None`` (default) asks it once, ``False`` treats it as Go logd.

    ``ssl_context``: connect with TLS (e.g. ``logd_trio.core.tls.client_context(ca=...)``);
    the server's certificate must name ``tls_hostname`` (default: the address's host).
    ``token``: sent with ``AUTH`` on every new connection (logd-trio's auth extension;
    default ``$LOGD_TOKEN``, none when unset).
    """
    client = Client(
        address or os.environ.get("LOGD_HOST") or DEFAULT_ADDRESS,
        retry=retry,
        request_timeout=request_timeout,
        max_reply=max_reply,
        extensions=extensions,
        ssl_context=ssl_context,
        tls_hostname=tls_hostname,
        token=token if token is not None else os.environ.get("LOGD_TOKEN") or None,
    )
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()

