"""The accept loop: admit or refuse each new client, and drain the open ones at shutdown.

Trio's ``serve_listeners`` is not used because of what it does when the process
runs out of descriptors (EMFILE/ENFILE): it logs a traceback and retries every
0.1 s while the waiting clients hang.  Here the loop keeps one spare descriptor:
when accept fails for lack of descriptors it frees the spare, accepts the
waiting client, answers ``ERR too many connections`` and closes it, so clients
get an answer instead of a hang (the spare is held again after every accept
that succeeds, so one lost is not lost for good; the accept loops share it, so
none overwrites another's); the condition is logged once per
:data:`REPORT_EVERY` seconds, without a traceback.  The connection caps of
:class:`~logd_trio.server.limits.Admission` normally keep the process well
away from that point.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Final, Protocol

import trio

from logd_trio.server.auth import Policy
from logd_trio.server.limits import REFUSING_MAX, Admission, Throttled, is_loopback, open_null
from logd_trio.server.stats import Counters
from logd_trio.server.tls import HANDSHAKE_TIMEOUT, Accepted, HandshakeFailed, ServerSocket, TLSSocket, accept_tls

__all__ = ["Listener", "Served", "exposed_addresses"]

log = logging.getLogger("logd_trio.server.listener")

REFUSAL: Final = b"ERR too many connections\r\n"
# accept() errors that mean "no resources right now", not a broken listener.
CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors about one client that gave up or was refused by the network: try the next.
TRANSIENT_ERRNOS: Final = frozenset(
    getattr(errno, name) for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET")
    if hasattr(errno, name))
BACKOFF_MIN: Final = 0.05
BACKOFF_MAX: Final = 1.0
REPORT_EVERY: Final = 10.0  # seconds between two log lines about the same condition
REFUSE_LINGER: Final = 1.0  # a refused client gets this long to read its ERR


class Served(Protocol):
    """What the listener needs of a connection."""

    async def run(self) -> None: ...

    def stop_reading(self) -> None: ...


# (accepted client, on_close) -> a connection that calls on_close(itself) when it ends
Factory = Callable[[Accepted, Callable[[Served], None]], Served]


def _peer(sock: trio.socket.SocketType) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:  # already reset by the peer
        return "?"


def exposed_addresses(addresses: Iterable[str]) -> list[str]:
    """The addresses among ``addresses`` that are not loopback (reachable from other hosts; a name
    that is not an IP address is counted among them rather than guessed)."""
    return [a for a in addresses if not is_loopback(a)]


class Listener:
    """Accepts on the bound sockets; owns the open connections through its :class:`Admission`."""

    def __init__(self, listeners: list[trio.SocketListener], admission: Admission[Served],
                 counters: Counters, factory: Factory, *, tls: ssl.SSLContext | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, policy: Policy | None = None) -> None:
        self.listeners = listeners
        self.tls = tls  # with a context, each client's TLS handshake comes first (_Handshaking)
        self.handshake_timeout = handshake_timeout
        self.policy = policy  # --auth-file: each client gets a Guard (auth.py)
        self.report_handshake = Throttled(log, logging.WARNING, REPORT_EVERY)
        self.admission = admission
        self.counters = counters
        self._factory = factory
        self._refusing = 0
        self._spare = open_null()
        self._report_refused = Throttled(log, logging.WARNING, REPORT_EVERY)
        self._report_no_fds = Throttled(log, logging.ERROR, REPORT_EVERY)

    async def serve(self, handlers: trio.Nursery) -> None:
        """Accept until cancelled; connections run in ``handlers``."""
        async with trio.open_nursery() as loops:
            for listener in self.listeners:
                loops.start_soon(self._accept_loop, listener.socket, handlers)

    async def _accept_loop(self, sock: trio.socket.SocketType, handlers: trio.Nursery) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as e:
                if e.errno in TRANSIENT_ERRNOS:
                    continue
                if e.errno not in CAPACITY_ERRNOS:
                    raise
                self._report_no_fds("cannot accept: %s; answering new clients 'ERR too many connections' "
                                    "(%d connections open)", os.strerror(e.errno), len(self.admission))
                got = await self._short_of_fds(sock)
                if got is False:
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                if isinstance(got, bool):
                    continue
                conn = got
            backoff = BACKOFF_MIN
            self._keep_spare()
            self._admit(conn, handlers)

    def _admit(self, conn: trio.socket.SocketType, handlers: trio.Nursery) -> None:
        address = _peer(conn)
        reason = self.admission.refusal(address)
        if reason is not None:
            self.counters.conns_refused += 1
            self._report_refused("refused a connection from %s: %s", address, reason)
            if self._refusing < REFUSING_MAX:
                self._refusing += 1
                handlers.start_soon(self._refuse, conn)
            else:  # a flood: answer without lingering
                self._refuse_now(conn)
            return
        served: Served
        if self.tls is None:
            trio.SocketStream(conn)  # sets TCP_NODELAY
            served = self._factory(self.accepted(conn, address, ""), self.admission.remove)
        else:
            served = _Handshaking(self, conn, address)
        self.admission.add(served, address)
        self.counters.conns_total += 1
        handlers.start_soon(served.run)

    def admit_relayed(self, sock: trio.socket.SocketType, address: str, handlers: trio.Nursery) -> None:
        """A client connection a worker process relays (``--workers``): it counts against this
        process's caps as a client of its own, and one beyond them gets the same refusal (the
        worker forwards it as the reply to the request relayed)."""
        reason = self.admission.refusal(address)
        if reason is not None:
            self.counters.conns_refused += 1
            self._report_refused("refused a relayed connection from %s: %s", address, reason)
            if self._refusing < REFUSING_MAX:  # lingers: closing a Unix socket unread resets it
                self._refusing += 1
                handlers.start_soon(self._refuse, sock)
            else:
                self._refuse_now(sock)
            return
        served = self._factory(self.accepted(sock, address, ""), self.admission.remove)
        self.admission.add(served, address)
        handlers.start_soon(served.run)

    def accepted(self, sock: ServerSocket, address: str, subject: str) -> Accepted:
        guard = None if self.policy is None else self.policy.guard(address, subject, self.counters)
        return Accepted(sock, address, subject, guard)

    def connection(self, accepted: Accepted, wrapper: Served) -> Served:
        """The connection of a client whose handshake is done (it stays admitted as ``wrapper``)."""
        return self._factory(accepted, lambda _: self.admission.remove(wrapper))

    async def _short_of_fds(self, sock: trio.socket.SocketType) -> trio.socket.SocketType | bool:
        """accept() failed for lack of descriptors.  Wait for a client, then: the client if
        descriptors are free again; True if it was refused through the spare descriptor (or gave up);
        False if nothing could be done (the caller backs off)."""
        await trio.lowlevel.wait_readable(sock)  # EMFILE comes before the queue is looked at
        try:
            conn, _ = await sock.accept()
            return conn
        except OSError as e:
            if e.errno in TRANSIENT_ERRNOS:
                return True
            if e.errno not in CAPACITY_ERRNOS:
                raise
        if self._spare is None:
            self._keep_spare()
            return False
        os.close(self._spare)
        self._spare = None
        try:
            conn, _ = await sock.accept()
            self.counters.conns_refused += 1
            self._refuse_now(conn)
        except OSError as e:
            if e.errno in TRANSIENT_ERRNOS:
                return True
            if e.errno not in CAPACITY_ERRNOS:
                raise
            return False
        finally:  # the slot the client took is free again: make it the spare
            self._keep_spare()
        return True

    def _keep_spare(self) -> None:
        """Hold the spare descriptor again if it was given up or lost (never a second one: the
        accept loops share it)."""
        if self._spare is None:
            self._spare = open_null()

    @staticmethod
    def _refuse_now(conn: trio.socket.SocketType) -> None:
        with contextlib.suppress(OSError):
            os.write(conn.fileno(), REFUSAL)  # a new socket's send buffer is empty: this does not block
        conn.close()

    async def _refuse(self, conn: trio.socket.SocketType) -> None:
        """Send the ERR, then read and drop what the client sends for a moment, so that
        closing does not reset the connection before the client has read the ERR."""
        try:
            with trio.move_on_after(REFUSE_LINGER), contextlib.suppress(OSError):
                await conn.send(REFUSAL)
                conn.shutdown(socket.SHUT_WR)
                while await conn.recv(4096):
                    pass
        finally:
            self._refusing -= 1
            conn.close()

    async def close(self) -> None:
        """Stop listening (new clients are refused by the kernel)."""
        for listener in self.listeners:
            await listener.aclose()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    async def drain(self) -> None:
        """Graceful shutdown: no new requests; return once every in-flight one is answered
        (the caller bounds the wait)."""
        for c in self.admission:
            c.stop_reading()
        await self.admission.wait_empty()


class _Handshaking:
    """An admitted TLS client: its handshake (bounded in time, cancelled by a graceful
    shutdown), then its connection, under one admission entry."""

    def __init__(self, listener: Listener, sock: trio.socket.SocketType, address: str) -> None:
        self._listener = listener
        self._sock = sock
        self._address = address
        self._scope = trio.CancelScope()
        self._inner: Served | None = None

    async def run(self) -> None:
        listener = self._listener
        assert listener.tls is not None
        trio.SocketStream(self._sock)  # sets TCP_NODELAY
        tls: TLSSocket | None = None
        try:
            with self._scope:  # cancelled by stop_reading(): accept_tls closes the socket
                tls = await accept_tls(self._sock, listener.tls, listener.handshake_timeout)
        except HandshakeFailed as e:
            listener.counters.error_kinds["tls"] += 1
            listener.report_handshake("TLS handshake with %s failed: %s", self._address, e)
        finally:
            if tls is None:
                listener.admission.remove(self)
        if tls is None:
            return
        self._inner = listener.connection(listener.accepted(tls, self._address, tls.subject), self)
        await self._inner.run()

    def stop_reading(self) -> None:
        if self._inner is not None:
            self._inner.stop_reading()
        else:
            self._scope.cancel()
