"""Socket calls for a connection's tasks without Trio's per-call checkpoints.

Trio's socket methods try the call and then yield to the scheduler even when
it succeeded, and a ``move_on_after`` per wait costs more again: on the
one-request-one-reply path (a small request, a small reply) those were a large
part of a request's server time.  Here:

* :func:`receive` after a short receive waits for readability first (the peer
  sent all it had: trying first would cost a call that fails); after a full one
  it tries first, and yields once when it got data without waiting, so a bulk
  sender cannot starve the other connections;
* :func:`send_now` tries a send and never waits; :func:`send_rest` waits for
  room, each wait for progress bounded by ``timeout``, in a cancel scope that
  only exists once a send has had to wait.

A caller that loops must reach a wait on every turn (the connection's reader
always does before its next receive; its writer before its next item).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

__all__ = ["Segments", "discard_input", "linger_close", "raw_socket", "receive", "send_now", "send_rest",
           "sendfile_now", "sendfile_rest"]

SENDFILE_CHUNK = 1 << 20
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20


def raw_socket(sock: trio.socket.SocketType) -> socket.socket:
    """The non-blocking stdlib socket under a Trio socket (Trio keeps it non-blocking)."""
    raw = vars(sock).get("_sock")
    if not isinstance(raw, socket.socket):
        raise TypeError(f"not a Trio socket over a stdlib socket: {type(sock).__name__}")
    return raw


async def receive(raw: socket.socket, view: memoryview, wait_first: bool) -> int:
    """``recv_into(view)``: 0 at EOF.  ``wait_first``: wait for readability before trying."""
    if not wait_first:
        await trio.lowlevel.checkpoint_if_cancelled()  # a stop or deadline reaches a bulk sender's reader
        try:
            n = raw.recv_into(view)
        except BlockingIOError:
            pass
        else:
            # got data without waiting: let the others run once (shielded: the data is taken)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return n
    while True:
        await trio.lowlevel.wait_readable(raw)
        try:
            return raw.recv_into(view)
        except BlockingIOError:
            continue


def send_now(raw: socket.socket, view: memoryview) -> int:
    """Send what the socket takes without waiting; the byte count (0 when it is full).

    (A READ header is not sent with MSG_MORE: with Trio's TCP_NOTSENT_LOWAT of 16 KiB the
    ``sendfile`` after it then waited for the 200 ms cork timeout, and with a higher
    low-water mark one packet instead of two measured no less server CPU.)"""
    try:
        return raw.send(view)
    except BlockingIOError:
        return 0


async def send_rest(raw: socket.socket, view: memoryview, progress: float,
                    on_scope: Callable[[trio.CancelScope | None], None],
                    before_wait: Callable[[], object] | None = None) -> None:
    """Send all of ``view``, waiting for room; ``progress`` seconds bound each wait for progress
    (``trio.TooSlowError``).  ``on_scope`` gets the scope bounding the waits (a caller may
    shorten its deadline), then None; ``before_wait`` is called before each wait."""
    with trio.fail_after(progress) as scope:
        on_scope(scope)
        try:
            while view:
                if before_wait is not None:
                    before_wait()
                await trio.lowlevel.wait_writable(raw)
                n = send_now(raw, view)
                if n:
                    view = view[n:]
                    scope.deadline = trio.current_time() + progress
        finally:
            on_scope(None)


Segments = Sequence[tuple[int, int, int]]  # (fd, position, length) ranges of files to send


def sendfile_now(raw: socket.socket, segments: Segments) -> tuple[int, int, int, int]:
    """``sendfile`` the segments while the socket takes them; ``(k, position, left, sent)``:
    segment ``k`` (``len(segments)`` when all went) has ``left`` bytes from ``position`` unsent."""
    out_fd = raw.fileno()
    sent = 0
    for k, (fd, pos, length) in enumerate(segments):
        while length:
            try:
                n = os.sendfile(out_fd, fd, pos, min(length, SENDFILE_CHUNK))
            except BlockingIOError:
                return k, pos, length, sent
            if n == 0:
                raise OSError("partition file shorter than its index")
            pos += n
            length -= n
            sent += n
    return len(segments), 0, 0, sent


async def sendfile_rest(raw: socket.socket, segments: Segments, at: tuple[int, int, int], progress: float,
                        on_scope: Callable[[trio.CancelScope | None], None],
                        before_wait: Callable[[], Segments] | None = None) -> int:
    """Send the segments from ``at`` (as :func:`sendfile_now` stopped), waiting for room, each wait
    for progress bounded as in :func:`send_rest`; the bytes sent.  ``before_wait`` is called
    before each wait and gives the segments to go on with (the same ranges, perhaps other fds)."""
    k, pos, length = at
    out_fd = raw.fileno()
    sent = 0
    with trio.fail_after(progress) as scope:
        on_scope(scope)
        try:
            while True:
                while length:
                    try:
                        n = os.sendfile(out_fd, segments[k][0], pos, min(length, SENDFILE_CHUNK))
                    except BlockingIOError:
                        if before_wait is not None:
                            segments = before_wait()
                        await trio.lowlevel.wait_writable(raw)
                        continue
                    if n == 0:
                        raise OSError("partition file shorter than its index")
                    pos += n
                    length -= n
                    sent += n
                    scope.deadline = trio.current_time() + progress
                k += 1
                if k >= len(segments):
                    return sent
                _, pos, length = segments[k]
                await trio.lowlevel.checkpoint_if_cancelled()
        finally:
            on_scope(None)


async def linger_close(raw: socket.socket) -> None:
    """Send FIN, then discard input briefly so the peer reads the last reply before the close
    (closing with unread input would reset the connection and destroy it)."""
    try:
        raw.shutdown(socket.SHUT_WR)
    except OSError:
        return
    await discard_input(lambda buf: receive(raw, buf, True))


async def discard_input(recv: Callable[[memoryview], Awaitable[int]]) -> None:
    """Read and drop what the peer still sends, for at most LINGER_SECONDS and LINGER_BYTES (or EOF)."""
    buf = memoryview(bytearray(65536))
    got = 0
    with trio.move_on_after(LINGER_SECONDS):
        while got < LINGER_BYTES:
            n = await recv(buf)
            if n == 0:
                break
            got += n
