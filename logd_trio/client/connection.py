"""One connection to a server: its stream, its reply parser, and the one place where a
transport failure (``OSError``, anyio's broken/closed resource errors, EOF) becomes
:class:`~logd_trio.core.errors.ConnectionLost`.  Re-exported by :mod:`logd_trio.client.transport`."""

from __future__ import annotations

import select
import socket
import ssl
from typing import Final

import anyio
import anyio.abc
import trio.lowlevel
from anyio.streams.tls import TLSStream

from logd_trio.core.defaults import DEFAULT_MAX_REPLY
from logd_trio.core.errors import BadReply, ConnectionLost
from logd_trio.core.replies import Reply, ReplyKind, ReplyParser
from logd_trio.core.requests import NEED_DATA
from logd_trio.core.tls import TLSFailed, describe

__all__ = ["IOV_BATCH", "RECV_SIZE", "Connection"]

RECV_SIZE: Final = 256 * 1024
IOV_BATCH: Final = 512  # buffers per sendmsg (Linux's IOV_MAX is 1024)
_STREAM_ERRORS: Final = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)


class Connection:
    """One TCP connection and its reply parser.  Not safe for concurrent use.

    Every transport failure surfaces here, and only here, as :class:`ConnectionLost`.
    """

    __slots__ = ("_fd", "_raw", "_tls_unheard", "address", "closed", "parser", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, *, address: str = "", max_reply: int = DEFAULT_MAX_REPLY):
        self.stream = stream
        self.address = address
        self.parser = ReplyParser(max_reply=max_reply)
        self.closed = False
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self._fd: int = raw.fileno() if raw is not None else -1
        # Plaintext under Trio: send_many writes several buffers with one sendmsg on the socket
        # itself (Trio's sockets are non-blocking stdlib ones; asyncio's transport buffers writes).
        self._raw: socket.socket | None = (
            raw if raw is not None and not isinstance(stream, TLSStream) and trio.lowlevel.in_trio_run() else None)
        # TLS and nothing received yet: a close now is the server refusing this client's certificate
        # (with TLS 1.3 the client's handshake is over before the server has checked it).
        self._tls_unheard = isinstance(stream, TLSStream)

    def is_stale(self) -> bool:
        """An idle connection that is readable has been closed (or sent junk): don't reuse it."""
        if self.closed:
            return True
        if self._fd < 0 or self.parser.buffered or self.parser.in_reply:
            return False
        try:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def _lost(self, exc: BaseException) -> ConnectionLost:
        self.closed = True
        if isinstance(exc, ssl.SSLError):  # e.g. TLS 1.3: a refused client certificate shows after the handshake
            return TLSFailed(f"connection to {self.address} lost: TLS: {describe(exc)}")
        if self._tls_unheard:
            return self._refused()
        return ConnectionLost(f"connection to {self.address} lost: {str(exc) or type(exc).__name__}")

    def _refused(self) -> TLSFailed:
        return TLSFailed(f"connection to {self.address} closed by the server right after the TLS handshake: it "
                         "requires a client certificate (--tls-cert/--tls-key) or does not trust this one")

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send(data)
        except _STREAM_ERRORS as exc:
            raise self._lost(exc) from exc

    async def send_many(self, parts: list[bytes]) -> None:
        """Send ``parts`` in order, as :meth:`send` would their concatenation: on a plaintext
        socket with ``sendmsg`` (at most IOV_BATCH buffers a call), the buffers not copied
        into one; joined otherwise (TLS, asyncio)."""
        sock = self._raw
        if sock is None:
            await self.send(b"".join(parts))
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        i, n = 0, len(parts)
        first: bytes | memoryview = parts[0] if parts else b""
        try:
            while i < n:
                try:
                    sent = sock.sendmsg([first, *parts[i + 1 : i + IOV_BATCH]])
                except BlockingIOError:
                    waited = True
                    try:
                        await trio.lowlevel.wait_writable(sock)
                    except trio.ClosedResourceError:  # closed by another task (the writer's receiver)
                        self.closed = True
                        raise ConnectionLost(f"connection to {self.address} closed while sending") from None
                    continue
                # skip what went out: whole buffers, then the start of a partly sent one
                while i < n and sent >= len(first):
                    sent -= len(first)
                    i += 1
                    first = parts[i] if i < n else b""
                if sent:
                    first = memoryview(first)[sent:]
        except OSError as exc:
            raise self._lost(exc) from exc
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _fill(self) -> None:
        try:
            data = await self.stream.receive(RECV_SIZE)
        except anyio.EndOfStream:
            self.closed = True
            if self._tls_unheard:
                raise self._refused() from None
            raise ConnectionLost(f"connection to {self.address} closed by the server") from None
        except _STREAM_ERRORS as exc:
            raise self._lost(exc) from exc
        self._tls_unheard = False
        self.parser.receive_data(data)

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
        await anyio.aclose_forcefully(self.stream)
