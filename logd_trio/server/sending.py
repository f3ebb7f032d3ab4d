"""A connection's socket I/O, plaintext or TLS, behind one face.

Plaintext goes through :mod:`logd_trio.server.sockio` on the stdlib socket under the Trio
socket (try first, wait only when needed; READ frames with ``sendfile``).  TLS goes through the
connection's :class:`~logd_trio.server.tls.TLSSocket` (Trio's SSLStream): READ frames are
copied through one bounded buffer (:func:`~logd_trio.server.tls.send_segments`), since
``sendfile`` would bypass the encryption.  Either way each wait for send progress is bounded
by the send timeout (``--timeout``; shortened once a graceful shutdown drains).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Protocol

import trio

from logd_trio.core import requests as p
from logd_trio.server.sockio import (
    Segments,
    discard_input,
    linger_close,
    raw_socket,
    receive,
    send_now,
    send_rest,
    sendfile_now,
    sendfile_rest,
)
from logd_trio.server.stats import Counters
from logd_trio.server.storage.reads import ReadPlan
from logd_trio.server.tls import SEND_CHUNK, ServerSocket, TLSSocket, send_segments

__all__ = ["Lender", "SocketIO"]


class Lender(Protocol):
    """Who lends a borrowed plan's fds past a wait: its topic (server/topic_reads.py)."""

    def lend(self) -> None: ...

    def give_back(self) -> None: ...


class SocketIO:
    """Receive, send and close for one connection's socket (plaintext or TLS)."""

    __slots__ = ("counters", "raw", "send_scope", "send_timeout", "tls")

    def __init__(self, sock: ServerSocket, counters: Counters, send_timeout: float) -> None:
        self.tls = sock if isinstance(sock, TLSSocket) else None
        self.raw: socket.socket | None = None
        if self.tls is None:
            assert isinstance(sock, trio.socket.SocketType)
            self.raw = raw_socket(sock)
        self.counters = counters
        self.send_timeout = send_timeout  # bound on each wait for send progress
        self.send_scope: trio.CancelScope | None = None  # the current send wait's, if any

    def shorten(self, seconds: float) -> None:
        """Each wait for send progress from now on (the current one included) lasts at most ``seconds``."""
        self.send_timeout = min(self.send_timeout, seconds)
        if self.send_scope is not None:
            self.send_scope.deadline = min(self.send_scope.deadline, trio.current_time() + self.send_timeout)

    def _on_scope(self, scope: trio.CancelScope | None) -> None:
        self.send_scope = scope

    async def receive(self, view: memoryview, wait_first: bool) -> int:
        """Bytes received into ``view`` (0 at EOF); see :func:`sockio.receive` for ``wait_first``."""
        if self.tls is not None:
            return await self.tls.recv_into(view)
        assert self.raw is not None
        return await receive(self.raw, view, wait_first)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send everything; the send timeout bounds each wait for progress, not the whole reply."""
        view = memoryview(data)
        if self.raw is not None:
            n = send_now(self.raw, view)
            if n < len(view):
                await send_rest(self.raw, view[n:], self.send_timeout, self._on_scope)
        else:
            await self._tls_send(view)
        self.counters.bytes_out += len(view)

    async def _tls_send(self, view: memoryview) -> None:
        assert self.tls is not None
        with trio.fail_after(self.send_timeout) as scope:
            self.send_scope = scope
            try:
                while view:
                    n = min(len(view), SEND_CHUNK)
                    await self.tls.stream.send_all(view[:n])
                    view = view[n:]
                    scope.deadline = trio.current_time() + self.send_timeout
            finally:
                self.send_scope = None

    async def send_plan(self, plan: ReadPlan, pending: bytearray, header: bytes | None = None,
                        lend: Lender | None = None) -> None:
        """Header (after what is pending) then the frames from the files.  A borrowed plan's fds are
        the partitions': before any wait the plan is made to own its fds, or while that fails (e.g.
        EMFILE) it keeps them, lent by ``lend`` (the topic keeps its partitions until they are given
        back), so the reply still goes out whole; the dup is tried again before each wait."""
        with plan:
            pending += p.reply_read_header(plan.offset, plan.nbatches) if header is None else header
            view = memoryview(pending)
            raw = self.raw
            at: tuple[int, int, int] | None = None
            if raw is not None:  # the usual case first: everything goes without a wait
                n = send_now(raw, view)
                if n == len(view):
                    k, pos, left, sent = sendfile_now(raw, plan.segments)
                    self.counters.bytes_out += n + sent
                    if k == len(plan.segments):
                        return
                    view, at = view[n:], (k, pos, left)
                else:
                    view = view[n:]
                    self.counters.bytes_out += n
            kept = _Kept(plan, lend)  # the socket is full: wait for room, bounded per wait
            try:
                if raw is None:  # TLS: bounded copies through the stream
                    await self._tls_plan(view, kept)
                    return
                if at is None:  # the header's rest, then the frames from the start
                    await send_rest(raw, view, self.send_timeout, self._on_scope, kept.segments)
                    self.counters.bytes_out += len(view)
                    if not plan.segments:
                        return
                    _, first, length = plan.segments[0]
                    at = (0, first, length)
                self.counters.bytes_out += await sendfile_rest(raw, plan.segments, at, self.send_timeout,
                                                               self._on_scope, kept.segments)
            finally:
                kept.give_back()

    async def _tls_plan(self, view: memoryview, kept: _Kept) -> None:
        await self.send_all(view)
        assert self.tls is not None
        with trio.fail_after(self.send_timeout) as scope:
            self.send_scope = scope
            try:
                if kept.lender is None:
                    await send_segments(self.tls, kept.plan.segments, scope, self.send_timeout, self.counters)
                    return
                for k in range(len(kept.plan.segments)):  # lent: one chunk at a time, the dup tried before each
                    _, pos, length = kept.plan.segments[k]
                    while length:
                        n = min(length, SEND_CHUNK)
                        await send_segments(self.tls, [(kept.segments()[k][0], pos, n)], scope, self.send_timeout,
                                            self.counters)
                        pos += n
                        length -= n
            finally:
                self.send_scope = None

    async def linger_close(self) -> None:
        """Send FIN, then discard input briefly so the peer reads the last reply before the close."""
        if self.raw is not None:
            await linger_close(self.raw)
            return
        assert self.tls is not None
        try:
            self.tls.shutdown(socket.SHUT_WR)  # no TLS close_notify: the FIN ends the stream
        except OSError:
            return
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await discard_input(self.tls.recv_into)


class _Kept:
    """A borrowed plan past a wait: it owns its fds (dup'ed), or while that fails, keeps the
    partitions' own, lent; :meth:`segments` (before each wait) tries the dup again and gives the
    lend back once it works, so a lend lasts only while the dup fails (e.g. EMFILE)."""

    __slots__ = ("lender", "plan")

    def __init__(self, plan: ReadPlan, lender: Lender | None) -> None:
        self.plan = plan
        self.lender: Lender | None = None
        try:
            plan.own()
        except OSError:
            if lender is None or not plan.borrowed:
                raise
            lender.lend()
            self.lender = lender

    def segments(self) -> Segments:
        if self.lender is not None:
            try:
                self.plan.own()
            except OSError:
                pass
            else:
                self.give_back()
        return self.plan.segments

    def give_back(self) -> None:
        lender, self.lender = self.lender, None
        if lender is not None:
            lender.give_back()
