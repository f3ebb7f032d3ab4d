"""A small HTTP/1.1 server for the monitoring endpoints: h11 for the protocol, Trio sockets for I/O.

It answers GET and HEAD with an async handler.  Every wait is bounded:
reading a request, sending a response, and a kept-alive connection's idle
time; connections beyond :data:`MAX_CONNECTIONS` are closed at once, and a
connection serves at most :data:`MAX_REQUESTS` requests before it is closed (so
keep-alive clients cannot hold every slot for good).  A failure while serving
one connection costs that connection only.  When accept fails for lack of
descriptors it backs off (as the client listener does), logging once per
10 s without a traceback.  It runs until cancelled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

from logd_trio.server.limits import Throttled
from logd_trio.server.listener import BACKOFF_MAX, BACKOFF_MIN, CAPACITY_ERRNOS, REPORT_EVERY, TRANSIENT_ERRNOS

__all__ = ["MAX_CONNECTIONS", "Request", "Response", "serve_http"]

log = logging.getLogger("logd_trio.server.http")

MAX_CONNECTIONS: Final = 64
MAX_REQUESTS: Final = 100
TIMEOUT: Final = 10.0  # idle before a request's first byte; then to receive it whole; to send a response
MAX_HEAD: Final = 16 * 1024  # h11 checks between reads: a head is refused (431) past MAX_HEAD + RECV_SIZE
MAX_BODY: Final = 64 * 1024  # a request body is read and discarded; beyond this: 413
RECV_SIZE: Final = 4 * 1024
LINGER: Final = 1.0  # after an error reply: drain what the peer still sends, so no reset eats the reply
_SERVER: Final = b"logd-trio"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-case

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def serve_http(
    host: str,
    port: int,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled; reports the bound ``(host, port)``."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        # The filename slot names what failed to bind, for the CLI's one-line error.
        raise OSError(e.errno, e.strerror or str(e), f"--http-host {host}:{port}") from e
    addr = listeners[0].socket.getsockname()
    active = [0]

    async def connection(stream: trio.SocketStream) -> None:
        if active[0] >= MAX_CONNECTIONS:
            await stream.aclose()
            return
        active[0] += 1
        try:
            await _serve_connection(stream, handler)
        except Exception:  # a bug must cost this connection, never the server
            log.exception("monitoring connection failed")
        finally:
            active[0] -= 1

    report = Throttled(log, logging.ERROR, REPORT_EVERY)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, connection, nursery, report)
        task_status.started((addr[0], addr[1]))


async def _accept_loop(listener: trio.SocketListener, connection: Callable[[trio.SocketStream], Awaitable[None]],
                       nursery: trio.Nursery, report: Throttled) -> None:
    """Accept until cancelled; without descriptors, back off instead of failing (or spinning)."""
    backoff = BACKOFF_MIN
    async with listener:
        while True:
            try:
                sock, _ = await listener.socket.accept()
            except OSError as e:
                if e.errno in TRANSIENT_ERRNOS:
                    continue
                if e.errno not in CAPACITY_ERRNOS:
                    raise
                report("monitoring: cannot accept: %s; retrying in %.2gs", os.strerror(e.errno), backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            nursery.start_soon(connection, trio.SocketStream(sock))


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    method = ["GET"]  # of the request being read, once its head is in (an error reply to HEAD has no body)
    try:
        for served in range(1, MAX_REQUESTS + 1):
            try:
                req = await _receive_request(stream, conn, method)
            except (_BadRequest, h11.RemoteProtocolError) as e:
                status = e.status if isinstance(e, _BadRequest) else e.error_status_hint
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(stream, conn, method[0], Response(status, f"{e}\n".encode()), close=True)
                    await _linger(stream)
                return
            if req is None:
                return
            if req.method not in ("GET", "HEAD"):
                resp = Response(405, b"only GET and HEAD\n", extra=(("Allow", "GET, HEAD"),))
            else:
                try:
                    resp = await handler(req)
                except Exception:  # a bug in a scrape must not cost more than this response
                    log.exception("monitoring request %s failed", req.path)
                    resp = Response(500, b"internal error, see the server log\n")
            await _send(stream, conn, req.method, resp, close=served == MAX_REQUESTS)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.LocalProtocolError):
        pass  # the peer went away or stalled: nothing to answer
    finally:
        await stream.aclose()


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then discard what the peer still sends for a moment (bounded in time and bytes)."""
    with trio.move_on_after(LINGER):
        await stream.send_eof()
        drained = 0
        while drained < MAX_BODY and (data := await stream.receive_some(RECV_SIZE)):
            drained += len(data)


async def _receive_request(stream: trio.SocketStream, conn: h11.Connection, method: list[str]) -> Request | None:
    """The next whole request (body discarded); None when the peer closes or stays idle.

    The idle wait before the request's first byte and the time to receive the
    rest of it are bounded separately, each by :data:`TIMEOUT`.
    """
    request: h11.Request | None = None
    body = 0
    started = False
    with trio.move_on_after(TIMEOUT) as scope:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECV_SIZE)
                if data and not started:
                    started = True
                    scope.deadline = trio.current_time() + TIMEOUT
                conn.receive_data(data)  # b"" is EOF
            elif isinstance(event, h11.Request):
                request = event
                method[0] = event.method.decode("ascii", "replace")
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_BODY:
                    raise _BadRequest(413, "request body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
                try:
                    path = urlsplit(request.target.decode("latin-1")).path
                except ValueError as e:  # e.g. "//[x": an unparsable authority
                    raise _BadRequest(400, f"bad request target: {e}") from None
                return Request(request.method.decode("ascii", "replace"), path, headers)
            else:  # ConnectionClosed or PAUSED
                return None
    if request is not None or started:  # a request started but did not finish in time
        raise _BadRequest(408, "request timeout")
    return None


async def _send(stream: trio.SocketStream, conn: h11.Connection, method: str, resp: Response, *,
                close: bool) -> None:
    headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body))),
               ("Server", _SERVER.decode()), *resp.extra]
    if close:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=resp.status, headers=headers,
                                  reason=HTTPStatus(resp.status).phrase.encode()))
    if method != "HEAD":
        data += conn.send(h11.Data(data=resp.body))
    data += conn.send(h11.EndOfMessage())
    with trio.fail_after(TIMEOUT):
        await stream.send_all(data)
