"""Trio client for logd servers (logd-trio or Go logd).

``open_client("host:port")`` gives a :class:`Client`; its request methods send
one request on the client's own connection and return the parsed reply.
:meth:`Client.writer` and :meth:`Client.scanner` open connections of their own.

Two boundaries, one place each:

* transport errors (``OSError``, ``trio.BrokenResourceError``, EOF) become
  :class:`~logd_trio.core.errors.ConnectionLost` inside :class:`Connection`;
* ``ERR <reason>`` becomes a typed :class:`~logd_trio.core.errors.ClientError` in
  :func:`logd_trio.core.replies.error_for_reason`.

Timeouts belong to the caller: wrap calls in ``trio.fail_after`` as usual.  A
``request_timeout`` given to :func:`open_client` is applied once per request
(connecting included) and raises :class:`~logd_trio.core.errors.Timeout`.

Retries: connecting retries with exponential backoff (:class:`RetryPolicy`).
A request that does not change the log (READ, TAIL, STATS, CONFIG, TOPICS,
PING) is sent once more on a new connection when the old one turns out to be
broken (not after :class:`~logd_trio.core.errors.BadReply`: a server that sends
bytes that are not a reply is not asked again).  A BATCH is never re-sent by the client: if the connection breaks
after it was sent, :class:`~logd_trio.core.errors.ConnectionLost` is raised and the
batch may or may not have been stored (the caller decides whether to retry,
accepting a possible duplicate: at-least-once).

Cancellation: cancelling a request while it waits for its reply closes that
connection (its reply stream is no longer in step with its requests); the next
request opens a new one.  Whether a cancelled BATCH was stored is unknown.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from logd_trio.core.errors import (
    BadReply,
    ConnectionLost,
    InvalidTopic,
    MessageTooLarge,
    NotFound,
    Timeout,
    Unsupported,
)
from logd_trio.core.framing import build_body, valid_topic
from logd_trio.core.replies import (
    DEFAULT_MAX_REPLY,
    ErrorReply,
    Message,
    MokReply,
    OffsetReply,
    PongReply,
    ReadReply,
    Reply,
    ReplyKind,
    ReplyParser,
)
from logd_trio.core.requests import DEFAULT_MAX_BATCH_SIZE, NEED_DATA, encode_batch, encode_read, encode_tail

if TYPE_CHECKING:
    from logd_trio.client.scanner import Scanner
    from logd_trio.client.writer import Writer

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

DEFAULT_PORT: Final = 1774
DEFAULT_ADDRESS: Final = f"127.0.0.1:{DEFAULT_PORT}"
_RECV_SIZE: Final = 256 * 1024


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"``, ``"host"``, ``":port"`` or ``"[v6]:port"`` -> (host, port)."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, _, port_s = address.partition(":")
    else:
        host, port_s = address, ""
    host = host or "127.0.0.1"
    if not port_s:
        return host, DEFAULT_PORT
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"invalid port in address {address!r}")
    return host, int(port_s)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How connecting retries: ``attempts`` tries in all, sleeping ``initial``,
    then ``initial * multiplier``, ... (at most ``maximum``) between them."""

    attempts: int = 10
    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.initial < 0 or self.maximum < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy delays must be >= 0 and multiplier >= 1")

    def delays(self) -> Iterator[float]:
        """The sleeps between attempts (``attempts - 1`` of them)."""
        delay = self.initial
        for _ in range(self.attempts - 1):
            yield min(delay, self.maximum)
            delay *= self.multiplier


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


class Connection:
    """One TCP connection and its reply parser.  Not safe for concurrent use.

    Every transport failure surfaces here, and only here, as
    :class:`ConnectionLost`.
    """

    __slots__ = ("_rbuf", "_sock", "address", "closed", "parser", "stream")

    def __init__(self, stream: trio.abc.Stream, *, address: str = "", max_reply: int = DEFAULT_MAX_REPLY):
        self.stream = stream
        self.address = address
        self.parser = ReplyParser(max_reply=max_reply)
        self.closed = False
        self._sock: Any = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._rbuf = bytearray(_RECV_SIZE) if self._sock is not None else bytearray()

    def is_stale(self) -> bool:
        """An idle connection that is readable has been closed (or sent junk): don't reuse it."""
        if self.closed:
            return True
        if self._sock is None or self.parser.buffered or self.parser.in_reply:
            return False
        try:
            return bool(self._sock.is_readable())
        except OSError:
            return True

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closed = True
            raise ConnectionLost(f"connection to {self.address} lost: {exc or type(exc).__name__}") from exc

    async def _fill(self) -> None:
        try:
            if self._sock is not None:
                view = memoryview(self._rbuf)
                n = await self._sock.recv_into(view)
                if n:
                    self.parser.receive_data(view[:n])
                    return
            else:
                data = await self.stream.receive_some(_RECV_SIZE)
                if data:
                    self.parser.receive_data(data)
                    return
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closed = True
            raise ConnectionLost(f"connection to {self.address} lost: {exc or type(exc).__name__}") from exc
        self.closed = True
        raise ConnectionLost(f"connection to {self.address} closed by the server")

    async def receive(self, kind: ReplyKind) -> Reply:
        """Wait for the next reply, parsed as an answer to ``kind``."""
        parser = self.parser
        while True:
            try:
                reply = parser.next_reply(kind)
            except BadReply:
                self.closed = True
                raise
            if reply is not NEED_DATA:
                return reply
            await self._fill()

    async def aclose(self) -> None:
        """Close now (idempotent); never blocks for long, also when cancelled."""
        self.closed = True
        await trio.aclose_forcefully(self.stream)


async def connect(address: str, *, retry: RetryPolicy, max_reply: int = DEFAULT_MAX_REPLY) -> Connection:
    """Open a connection, retrying with backoff; :class:`ConnectionLost` when all attempts fail."""
    host, port = parse_address(address)
    delays = retry.delays()
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            delay = next(delays, None)
            if delay is None:
                raise ConnectionLost(
                    f"cannot connect to {host}:{port} ({retry.attempts} attempts): {exc.strerror or exc}"
                ) from exc
            await trio.sleep(delay)
            continue
        return Connection(stream, address=f"{host}:{port}", max_reply=max_reply)


@contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    if seconds is None:
        yield
        return
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise Timeout(f"no reply within {seconds:g} s") from None


class Session:
    """Serialised request/reply on one (re)connectable connection, shared by tasks."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._conn: Connection | None = None
        self._lock = trio.Lock()

    async def request(
        self, data: bytes, kind: ReplyKind, *, idempotent: bool = True, extra_time: float = 0.0
    ) -> Reply:
        """Send ``data``, return its reply (an :class:`ErrorReply` is returned, not raised)."""
        timeout = self._client.request_timeout
        async with self._lock:
            with _deadline(None if timeout is None else timeout + extra_time):
                return await self._request(data, kind, idempotent)

    async def _request(self, data: bytes, kind: ReplyKind, idempotent: bool) -> Reply:
        for attempt in (1, 2):
            conn = self._conn
            if conn is None or conn.is_stale():
                if conn is not None:
                    await conn.aclose()
                self._conn = None
                conn = self._conn = await self._client.connect()
            try:
                await conn.send(data)
                return await conn.receive(kind)
            except ConnectionLost as exc:
                await self.aclose()
                if attempt == 2 or not idempotent or isinstance(exc, BadReply):
                    raise
            except BaseException:
                await self.aclose()  # cancelled or failed mid-request: the reply stream is out of step
                raise
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()


def _check_topic(topic: str) -> bytes:
    raw = topic.encode("ascii", "replace")
    if not valid_topic(raw):
        raise InvalidTopic(f"invalid topic name {topic!r}: use 1..255 of [A-Za-z0-9._-]")
    return raw


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
    ) -> None:
        host, port = parse_address(address)
        self.address = f"{host}:{port}"
        self.retry = retry or RetryPolicy()
        self.request_timeout = request_timeout
        self.max_reply = max_reply
        self.server_info: ServerInfo | None = None
        self._extensions: bool | None = None
        self._session = Session(self)

    # ------------------------------------------------------------ plumbing

    async def connect(self) -> Connection:
        """A new connection to the server (retrying per :attr:`retry`)."""
        return await connect(self.address, retry=self.retry, max_reply=self.max_reply)

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
        _check_topic(topic)
        msgs = [bytes(m) for m in messages]
        if not msgs:
            raise ValueError("a batch needs at least one message")
        request = encode_batch(topic, build_body(msgs), len(msgs))
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
        _check_topic(topic)
        extra = (wait_ms or 0) / 1000
        reply = await self._session.request(encode_read(topic, offset, limit, wait_ms), ReplyKind.READ,
                                            extra_time=extra)
        _raise_if_error(reply)
        assert isinstance(reply, ReadReply)
        return reply

    async def tail(self, topic: str, limit: int = 1000) -> ReadReply:
        """TAIL: like :meth:`read` from the oldest retained batch."""
        _check_topic(topic)
        reply = await self._session.request(encode_tail(topic, limit), ReplyKind.READ)
        _raise_if_error(reply)
        assert isinstance(reply, ReadReply)
        return reply

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

    async def ping(self) -> float:
        """Round-trip time in seconds (PING, or CONFIG on servers without the extension)."""
        ext = await self.supports_extensions()
        start = trio.current_time()
        if ext:
            reply = await self._session.request(b"PING\r\n", ReplyKind.PONG)
            _raise_if_error(reply)
        else:
            await self._mok(b"CONFIG\r\n")
        return trio.current_time() - start

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
            with _deadline(self.request_timeout):
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
                with trio.move_on_after(10):
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
            return (await self.tail(topic, 1)).offset
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

    def writer(self, topic: str, **options: Any) -> AbstractAsyncContextManager[Writer]:
        """``async with client.writer(topic, ...) as w``: see :class:`logd_trio.client.writer.Writer`."""
        from logd_trio.client.writer import open_writer

        return open_writer(self, topic, **options)

    def scanner(self, topic: str, **options: Any) -> Scanner:
        """``async with client.scanner(topic, ...) as s``: see :class:`logd_trio.client.scanner.Scanner`."""
        from logd_trio.client.scanner import Scanner

        return Scanner(self, topic, **options)


@asynccontextmanager
async def open_client(
    address: str | None = None,
    *,
    retry: RetryPolicy | None = None,
    request_timeout: float | None = None,
    max_reply: int = DEFAULT_MAX_REPLY,
) -> AsyncIterator[Client]:
    """``async with open_client("host:port") as client``.  ``address`` defaults to
    ``$LOGD_HOST`` or ``127.0.0.1:1774``.  Connects lazily, on the first request."""
    client = Client(
        address or os.environ.get("LOGD_HOST") or DEFAULT_ADDRESS,
        retry=retry,
        request_timeout=request_timeout,
        max_reply=max_reply,
    )
    try:
        yield client
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()

