"""Administrative extension commands (``DELETE <topic>``), answered in reply order.

A connection queues an :class:`AdminRequest` where its reply belongs and its
reader waits for :attr:`AdminRequest.done` before it takes the next request;
the writer carries the request out when its turn comes.  So everything
pipelined before a DELETE on that connection is answered before the topic
goes (batches acknowledged, reads served), and everything after it finds the
topic gone (a BATCH creates it anew).  :func:`check_admin` is the one place
the ``admin`` right of a request is checked.
"""

from __future__ import annotations

import logging

import trio

from logd_trio.core import requests as p
from logd_trio.core.errors import LogdError, NotFound, RequestError, StorageError
from logd_trio.server.limits import Throttled
from logd_trio.server.reasons import error_kind, error_reply
from logd_trio.server.registry import Registry
from logd_trio.server.stats import Counters

__all__ = ["AdminRequest", "check_admin", "peer_of", "report_refusal"]

log = logging.getLogger("logd_trio.server.admin")
_refusals = Throttled(logging.getLogger("logd_trio.server.limits"), logging.WARNING, 10.0)


def report_refusal(command: str, error: RequestError, sock: trio.socket.SocketType) -> None:
    """A request refused by a limit or a rule (``ERR maximum topics allowed``, ``ERR topic not
    allowed``, ``ERR not leader``...): one WARNING with the peer's address, at most every 10 s."""
    _refusals("refused %s from %s: %s", command.upper(), peer_of(sock), error.reason)


def peer_of(sock: trio.socket.SocketType) -> str:
    """``HOST:PORT`` of a connected socket's peer, for log lines ("?" once it is gone)."""
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def check_admin(request: p.Delete, peer: str) -> None:
    """Raise ``RequestError("not allowed")`` unless the client may administer ``request.topic``.

    Every client may until authentication exists: this is where its ``admin`` right
    on the topic is checked (and a refusal counted and logged with ``peer``)."""


class AdminRequest:
    """One administrative request waiting for its turn in a connection's reply order."""

    __slots__ = ("counters", "done", "peer", "registry", "request")

    def __init__(self, request: p.Delete, registry: Registry, counters: Counters, peer: str) -> None:
        self.request = request
        self.registry = registry
        self.counters = counters
        self.peer = peer
        self.done = trio.Event()  # set once answered: the connection's reader goes on then

    async def answer(self) -> bytes:
        """Carry the request out; its reply (``OK`` or ``ERR <reason>``)."""
        req = self.request
        try:
            check_admin(req, self.peer)
            await self.registry.delete(req.topic, by=self.peer)
        except (NotFound, RequestError, StorageError) as e:
            self._failed(e)
            return error_reply(e)
        finally:
            self.done.set()
        return p.REPLY_OK

    def _failed(self, e: LogdError) -> None:
        self.counters.errors["delete"] += 1
        self.counters.error_kinds[error_kind(e)] += 1
        if isinstance(e, RequestError):
            log.warning("DELETE %s from %s refused: %s", self.request.topic, self.peer, e.reason)
