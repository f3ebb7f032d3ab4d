"""A worker process of ``logd serve --workers N``: ``python -m logd_trio.server.workers.worker``.

Started by the owning process (:mod:`.pool`), which writes one JSON line to its
stdin (the configuration and where the head table and the owner's relay socket
are) and keeps stdin open: EOF there means the owner is gone, and the worker
stops.  The worker binds the server's port with ``SO_REUSEPORT``, says
``ready <pid>`` on stdout, and serves each accepted client with a
:class:`~.session.Session` until SIGTERM (SIGINT is ignored: the owner decides).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Final

import trio

from logd_trio.server.logs import setup_logging
from logd_trio.server.stats import Counters
from logd_trio.server.workers.heads import HeadTable
from logd_trio.server.workers.session import Session
from logd_trio.server.workers.sockets import config_from_json, reuseport_listeners
from logd_trio.server.workers.view import Views

__all__ = ["main"]

log = logging.getLogger("logd_trio.server.workers.worker")

REFUSAL: Final = b"ERR too many connections\r\n"
ACCEPT_BACKOFF: Final = 0.1
ACCEPT_WARN_EVERY: Final = 10.0  # seconds between two warnings of a failing accept
REFRESH_EVERY: Final = 1.0  # seconds between two looks at every open view's slot


class Worker:
    """The worker process's state (a :class:`~.session.WorkerContext`)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.config = config_from_json(spec["config"])
        self.counters = Counters()
        self.heads = HeadTable(Path(spec["heads"]))
        self.views = Views(Path(self.config.workdir))
        self.upstream_path: str = spec["upstream"]
        self.port: int = spec["port"]
        self.index: int = spec["index"]
        self.sessions: set[Session] = set()
        self.stopping = trio.Event()
        self._empty = trio.Event()  # set when the last session ends
        self._accept_warned = -math.inf
        self._empty.set()

    async def serve(self) -> None:
        host, _ = self.config.address
        listeners = await reuseport_listeners(host, self.port)
        sys.stdout.write(f"ready {os.getpid()}\n")
        sys.stdout.flush()
        log.info("worker %d (pid %d) listening on port %d", self.index, os.getpid(), self.port)
        try:
            async with trio.open_nursery() as root:
                root.start_soon(self._watch_owner)
                root.start_soon(self._watch_signals)
                root.start_soon(self._refresh_views)
                async with trio.open_nursery() as handlers:
                    async with trio.open_nursery() as accept:
                        for listener in listeners:
                            accept.start_soon(self._accept, listener.socket, handlers)
                        await self.stopping.wait()
                        accept.cancel_scope.cancel()
                    for listener in listeners:
                        await listener.aclose()
                    for s in list(self.sessions):
                        s.stop()
                    with trio.move_on_after(self.config.shutdown_timeout):
                        await self._empty.wait()
                    handlers.cancel_scope.cancel()
                root.cancel_scope.cancel()
        finally:
            self.views.close()
            self.heads.close()
        log.info("worker %d (pid %d) stopped", self.index, os.getpid())

    async def _watch_owner(self) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        async with stdin:
            while await stdin.receive_some(4096):
                pass
        log.warning("worker %d: the owning process is gone: stopping", self.index)
        self.stopping.set()

    async def _refresh_views(self) -> None:
        """Close the files of partitions the owner dropped (retention, DELETE) even when no READ of
        their topic comes: an open descriptor would keep their disk space."""
        while True:
            await trio.sleep(REFRESH_EVERY)
            self.views.refresh(self.heads)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                self.stopping.set()

    async def _accept(self, sock: trio.socket.SocketType, handlers: trio.Nursery) -> None:
        while True:
            try:
                conn, addr = await sock.accept()
            except OSError as e:  # EMFILE and the like: warned once per ACCEPT_WARN_EVERY, retried
                now = trio.current_time()
                if now >= self._accept_warned + ACCEPT_WARN_EVERY:
                    self._accept_warned = now
                    log.warning("worker %d: accept failed: %s (retried every %gs; next warning in %gs at the "
                                "earliest)", self.index, os.strerror(e.errno or 0), ACCEPT_BACKOFF, ACCEPT_WARN_EVERY)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            address = str(addr[0]) if isinstance(addr, tuple) else "?"
            if len(self.sessions) >= self.config.max_connections:
                with contextlib.suppress(OSError):
                    os.write(conn.fileno(), REFUSAL)  # a new socket's buffer is empty: no block
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = Session(conn, address, self)
            self.sessions.add(session)
            if self._empty.is_set():
                self._empty = trio.Event()
            if log.isEnabledFor(logging.DEBUG):  # -v; tests find which process a client reached by this line
                log.debug("worker %d (pid %d): connection from %s:%s", self.index, os.getpid(), address,
                          addr[1] if isinstance(addr, tuple) else "?")
            handlers.start_soon(self._run, session)

    async def _run(self, session: Session) -> None:
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            if not self.sessions:
                self._empty.set()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches the owner, which stops us
    line = sys.stdin.buffer.readline()
    if not line:
        return
    spec = json.loads(line)
    setup_logging(spec.get("log_format", "text"), verbose=bool(spec.get("verbose")))
    trio.run(Worker(spec).serve)


if __name__ == "__main__":
    main()
