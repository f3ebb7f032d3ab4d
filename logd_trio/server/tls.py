"""TLS on the server: the context from ``--tls-cert/--tls-key[/--tls-client-ca]``, the handshake
of each accepted client (bounded in time, plaintext clients told so in plaintext), and the
socket face a :class:`~logd_trio.server.connection.Connection` uses over a :class:`trio.SSLStream`.

Reads cannot use ``sendfile`` over TLS (the kernel would send the file's bytes unencrypted):
:func:`send_segments` copies each READ through one buffer of :data:`CHUNK` bytes, read with
``os.preadv`` from the page cache and handed to the TLS stream, so a READ never sits whole in
memory, however large it is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from logd_trio.core.tls import MIN_VERSION, RECORD_HANDSHAKE, describe, load_ca, load_chain, subject_text
from logd_trio.server.auth import Guard
from logd_trio.server.config import ConfigError, ServerConfig
from logd_trio.server.stats import Counters

__all__ = ["CHUNK", "HANDSHAKE_TIMEOUT", "PLAINTEXT_REFUSAL", "SEND_CHUNK", "Accepted", "HandshakeFailed",
           "ServerSocket", "TLSSocket", "accept_tls", "plain_socket", "send_segments", "server_context"]

CHUNK: Final = 256 * 1024  # bytes of a READ held at once per TLS connection
SEND_CHUNK: Final = 256 * 1024  # bytes handed to the TLS stream per send (the send timeout counts progress)
HANDSHAKE_TIMEOUT: Final = 10.0  # seconds a client gets to complete the TLS handshake (capped by --timeout)
PLAINTEXT_REFUSAL: Final = b"ERR tls required\r\n"


@dataclass(frozen=True, slots=True)
class Accepted:
    """An admitted client as a connection gets it: its socket (TLS already set up, if any), the
    peer's address and its certificate's subject ("" without one)."""

    socket: ServerSocket
    address: str
    subject: str = ""
    guard: Guard | None = None  # what this client may do (server/auth.py); None: no --auth-file


class HandshakeFailed(Exception):
    """A client did not complete the TLS handshake; the message is the line to log."""


class ServerSocket(Protocol):
    """The socket operations a connection uses: a trio socket's, or :class:`TLSSocket`'s."""

    def recv_into(self, buffer: bytearray | memoryview, /) -> Awaitable[int]: ...

    def send(self, data: bytearray | memoryview, /) -> Awaitable[int]: ...

    def shutdown(self, how: int, /) -> None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


def plain_socket(sock: ServerSocket) -> trio.socket.SocketType:
    """The Trio socket under ``sock`` (itself, without TLS): for its peer's address."""
    if isinstance(sock, TLSSocket):
        return sock.raw
    assert isinstance(sock, trio.socket.SocketType)
    return sock


def server_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None without ``tls_cert``.  :class:`ConfigError` (one line,
    naming the file) when a file cannot be used."""
    if not config.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.num_tickets = 0  # no session tickets: nothing arrives at an idle client (it would look closed)
    try:
        load_chain(ctx, config.tls_cert, config.tls_key, "tls_cert")
        if config.tls_client_ca:
            load_ca(ctx, config.tls_client_ca, "tls_client_ca")
            ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no connection
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ctx


class TLSSocket:
    """A :class:`ServerSocket` over a :class:`trio.SSLStream` whose handshake is done."""

    __slots__ = ("raw", "stream", "subject")

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], subject: str) -> None:
        self.stream = stream
        self.raw = stream.transport_stream.socket
        self.subject = subject  # the client certificate's subject ("" without one)

    async def recv_into(self, buffer: bytearray | memoryview, /) -> int:
        data = await self.stream.receive_some(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    async def send(self, data: bytearray | memoryview, /) -> int:
        n = min(len(data), SEND_CHUNK)
        await self.stream.send_all(memoryview(data)[:n])
        return n

    def shutdown(self, how: int, /) -> None:
        # No TLS half-close: the FIN after the last record tells the client the server is done
        # (clients read our replies as length-delimited, so a cut is still detected).
        self.raw.shutdown(how)

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()


async def _refuse_plaintext(sock: trio.socket.SocketType, linger: float) -> None:
    """Tell a plaintext client, in plaintext, then let it read that before the close."""
    with contextlib.suppress(OSError), trio.move_on_after(linger):
        await sock.send(PLAINTEXT_REFUSAL)
        sock.shutdown(socket.SHUT_WR)
        while await sock.recv(4096):
            pass


async def accept_tls(sock: trio.socket.SocketType, ctx: ssl.SSLContext, seconds: float) -> TLSSocket:
    """The TLS handshake of an accepted client, within ``seconds`` seconds.

    A client whose first byte is not a TLS handshake record gets ``ERR tls required`` in
    plaintext.  Raises :class:`HandshakeFailed` (the socket is then closed) with the reason.
    """
    try:
        with trio.fail_after(seconds):
            first = await sock.recv(1, socket.MSG_PEEK)
            if not first:
                raise HandshakeFailed("closed before the TLS handshake")
            if first[0] != RECORD_HANDSHAKE:
                await _refuse_plaintext(sock, min(seconds, 1.0))
                raise HandshakeFailed("a plaintext client on the TLS port: answered 'ERR tls required'")
            stream = trio.SSLStream(trio.SocketStream(sock), ctx, server_side=True, https_compatible=True)
            await stream.do_handshake()
    except trio.TooSlowError:
        sock.close()
        raise HandshakeFailed(f"no TLS handshake within {seconds:g}s") from None
    except HandshakeFailed:
        sock.close()
        raise
    except (trio.BrokenResourceError, OSError) as e:
        sock.close()
        raise HandshakeFailed(describe(e)) from None
    except BaseException:  # cancelled (shutdown): nothing else owns the socket
        sock.close()
        raise
    cert = stream.getpeercert()
    subject = subject_text(cert.get("subject", ())) if cert else ""
    return TLSSocket(stream, subject)


async def send_segments(sock: TLSSocket, segments: Sequence[tuple[int, int, int]], scope: trio.CancelScope,
                        send_timeout: float, counters: Counters) -> None:
    """Send ``(fd, position, length)`` ranges through the TLS stream, :data:`CHUNK` bytes at a time.

    ``scope`` bounds each wait for progress: its deadline moves ``send_timeout`` ahead after each chunk.
    """
    buf = bytearray(min(CHUNK, max((length for _, _, length in segments), default=0)) or 1)
    view = memoryview(buf)
    for fd, pos, length in segments:
        while length:
            n = os.preadv(fd, [view[:min(length, len(buf))]], pos)  # the page cache: no thread hop
            if n == 0:
                raise OSError("partition file shorter than its index")
            await sock.stream.send_all(view[:n])
            pos += n
            length -= n
            counters.bytes_out += n
            scope.deadline = trio.current_time() + send_timeout
