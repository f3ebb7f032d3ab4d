"""``logd bench`` over TLS and with a token: the bench's load speaks to trio sockets, so a TLS
connection is a socket here too (:class:`TLSBenchSocket`: the few socket calls the load makes,
through a :class:`trio.SSLStream`), and :func:`open_connection` also sends ``AUTH`` when given a token.
"""

from __future__ import annotations

import ssl
from types import TracebackType
from typing import Final, Self

import trio
from typing_extensions import Buffer

from logd_trio.core.errors import LogdError
from logd_trio.core.tls import describe

__all__ = ["TLSBenchSocket", "open_connection"]

HANDSHAKE_TIMEOUT: Final = 10.0


class TLSBenchSocket(trio.socket.SocketType):
    """The socket calls of the bench (send, recv, recv_into, close) over TLS."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        super().__init__()
        self._stream = stream
        self._raw = stream.transport_stream.socket

    async def send(self, bytes: Buffer, flags: int = 0, /) -> int:
        view = memoryview(bytes)
        await self._stream.send_all(view)
        return len(view)

    async def recv(self, buflen: int, flags: int = 0, /) -> bytes:
        return bytes(await self._stream.receive_some(buflen))

    async def recv_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer)
        data = await self._stream.receive_some(nbytes or len(view))
        view[:len(data)] = data
        return len(data)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TLSBenchSocket fd={self._raw.fileno()}>"


async def open_connection(address: tuple[str, int], ssl_context: ssl.SSLContext | None = None,
                          token: str | None = None) -> trio.socket.SocketType:
    """A connected socket (TCP_NODELAY), TLS with ``ssl_context``, authenticated with ``token``."""
    host, port = address
    stream = await trio.open_tcp_stream(host, port)  # sets TCP_NODELAY
    sock: trio.socket.SocketType = stream.socket
    if ssl_context is not None:
        tls = trio.SSLStream(stream, ssl_context, server_hostname=host, https_compatible=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except trio.TooSlowError:
            stream.socket.close()
            raise LogdError(f"no TLS handshake with {host}:{port} within {HANDSHAKE_TIMEOUT:g}s") from None
        except trio.BrokenResourceError as e:
            stream.socket.close()
            raise LogdError(f"TLS handshake with {host}:{port} failed: {describe(e)}") from None
        sock = TLSBenchSocket(tls)
    if token:
        await sock.send(b"AUTH %s\r\n" % token.encode("ascii"))
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = await sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        if reply != b"OK\r\n":
            sock.close()
            raise LogdError(f"AUTH refused by {host}:{port}: {reply.strip().decode('ascii', 'replace') or 'closed'}")
    return sock
