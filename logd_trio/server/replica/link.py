"""A follower's connection to its leader: TCP, then TLS with ``replicate_ca`` (presenting the
node's own ``tls_cert`` when it has one: mutual TLS), then ``AUTH`` with ``replicate_token``.

The TLS context is built once per setting (:func:`leader_context`, also called at start so a bad
file stops the server with one line instead of failing every reconnect).
"""

from __future__ import annotations

import functools
import ssl
from typing import Final

import trio

from logd_trio.core.errors import LogdError
from logd_trio.core.tls import TLSConfigError, client_context, describe
from logd_trio.server.config import ConfigError, ServerConfig

__all__ = ["LinkRefused", "leader_context", "open_link"]

CONNECT_TIMEOUT: Final = 5.0  # connecting, the TLS handshake and AUTH, together
MAX_AUTH_REPLY: Final = 4096


class LinkRefused(LogdError):
    """The leader refused this node's TLS handshake or token (logged, then retried with backoff)."""


@functools.lru_cache(maxsize=4)
def _context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    return client_context(ca, cert or None, key or None)


def leader_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The context a follower connects to its leader with (None: plaintext); :class:`ConfigError`
    naming the file when one cannot be used."""
    if not config.replicate_ca:
        return None
    try:
        return _context(config.replicate_ca, config.tls_cert, config.tls_key)
    except TLSConfigError as e:
        raise ConfigError(f"replicate_ca: {e}") from None


async def _authenticate(stream: trio.abc.Stream, token: str) -> None:
    await stream.send_all(b"AUTH %s\r\n" % token.encode("ascii", "replace"))
    reply = b""
    while b"\n" not in reply and len(reply) < MAX_AUTH_REPLY:
        chunk = await stream.receive_some(MAX_AUTH_REPLY)
        if not chunk:
            break
        reply += chunk
    if reply != b"OK\r\n":
        said = reply.strip()[:200].decode("ascii", "replace") or "closed the connection"
        raise LinkRefused(f"the leader refused replicate_token: {said}")


async def open_link(host: str, port: int, config: ServerConfig) -> trio.abc.Stream:
    """A stream to the leader, TLS and authenticated as configured, within :data:`CONNECT_TIMEOUT`."""
    ctx = leader_context(config)
    with trio.fail_after(CONNECT_TIMEOUT):
        tcp = await trio.open_tcp_stream(host, port)
        stream: trio.abc.Stream = tcp
        try:
            if ctx is not None:
                tls = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True)
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as e:
                    raise LinkRefused(f"TLS handshake with the leader failed: {describe(e)}") from None
                stream = tls
            if config.replicate_token:
                await _authenticate(stream, config.replicate_token)
        except BaseException:
            tcp.socket.close()
            raise
    return stream
