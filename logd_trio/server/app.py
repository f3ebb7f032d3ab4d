"""The server: the nursery tree of ARCHITECTURE.md.

::

    serve(config, task_status)
     └ root nursery
        ├ stats task (STATS / CONFIG / TOPICS)
        ├ topics nursery: one task per topic (recovered before the listener opens)
        └ connections nursery: trio.serve_listeners, one Connection per socket

Shutdown (``shutdown`` event set, e.g. by SIGINT/SIGTERM in :func:`run`):
stop accepting, stop reading new requests, give in-flight requests
``shutdown_timeout`` to be answered, then close every topic's input so each
topic drains, fsyncs and closes its files.  Cancelling :func:`serve` instead
skips the grace period but still fsyncs every topic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import trio

from logd_trio.core.errors import RequestError, StorageError
from logd_trio.server.config import ServerConfig
from logd_trio.server.connection import Connection
from logd_trio.server.metrics import Monitor, serve_monitoring
from logd_trio.server.stats import Counters, StatsRequest, TopicView, run_stats_task
from logd_trio.server.storage.files import list_topics, make_root
from logd_trio.server.topic import Topic

__all__ = ["Registry", "run", "serve"]

log = logging.getLogger("logd_trio.server.app")


class Registry:
    """The server's topics: lookup, creation on first BATCH, and their limits."""

    def __init__(self, config: ServerConfig, nursery: trio.Nursery, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self.root = Path(config.workdir)
        self.topics: dict[str, Topic] = {}
        self.host = config.host  # the bound address once listening
        self.accepting = False  # listening and not shutting down (for /readyz)
        self._nursery = nursery
        self._creating: dict[str, trio.Event] = {}
        self._created = trio.Event()

    def get(self, name: str) -> Topic | None:
        return self.topics.get(name)

    async def wait_created(self) -> None:
        await self._created.wait()

    async def get_or_create(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is not None:
            return topic
        wl = self.config.topics_whitelist
        if wl and name not in wl:
            self.counters.topics_disallowed += 1
            raise RequestError("topic not allowed")
        while name in self._creating:
            await self._creating[name].wait()
            topic = self.topics.get(name)
            if topic is not None:
                return topic
        if len(self.topics) + len(self._creating) >= self.config.topics:
            raise RequestError("maximum topics allowed")
        return await self._start(name)

    async def _start(self, name: str) -> Topic:
        event = self._creating[name] = trio.Event()
        try:
            try:
                topic = await trio.to_thread.run_sync(Topic.open, self.root, name, self.config)
            except (OSError, StorageError) as e:
                # Details (paths) go to the log, not to the client.
                log.error("cannot open topic %s: %s", name, e)
                cause = e if isinstance(e, OSError) else e.__cause__
                why = cause.strerror if isinstance(cause, OSError) and cause.strerror else "see the server log"
                raise StorageError(f"cannot open topic {name}: {why}") from e
            topic.histograms = self.counters.histograms
            await self._nursery.start(topic.run)
            self.topics[name] = topic
            self._created.set()
            self._created = trio.Event()
            return topic
        finally:
            del self._creating[name]
            event.set()

    async def open_existing(self) -> None:
        names = await trio.to_thread.run_sync(list_topics, self.root)
        if "default" not in names:
            names.append("default")
        if len(names) > self.config.topics:
            log.warning("%d topics on disk exceed --topics=%d; all are served, no new ones accepted",
                        len(names), self.config.topics)
        for name in sorted(names):
            await self._start(name)
            log.debug("topic %s: first=%d head=%d", name, self.topics[name].first, self.topics[name].visible_head)

    def views(self) -> Mapping[str, TopicView]:
        return {n: TopicView(t.first, t.visible_head, t.fsyncs, t.synced_batches) for n, t in self.topics.items()}

    def close_inputs(self) -> None:
        for t in self.topics.values():
            t.close_input()


def _absolute(path: Path) -> str:
    """For log lines: no file system access (cwd is known)."""
    return os.path.abspath(path)


class _Connections:
    def __init__(self) -> None:
        self.open: set[Connection] = set()
        self.empty = trio.Event()
        self.empty.set()

    def add(self, c: Connection) -> None:
        self.open.add(c)
        self.empty = trio.Event()

    def remove(self, c: Connection) -> None:
        self.open.discard(c)
        if not self.open:
            self.empty.set()


async def serve(
    config: ServerConfig,
    *,
    shutdown: trio.Event | None = None,
    on_http_bound: Callable[[tuple[str, int]], None] | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a server until ``shutdown`` is set (graceful) or the call is cancelled.

    Reports ``(host, port)`` through ``task_status`` once listening, so
    ``await nursery.start(serve, config)`` with port 0 gives the real port;
    with ``http_host`` set, ``on_http_bound`` gets the monitoring address
    before recovery starts.
    """
    root = Path(config.workdir)
    log.info("starting on %s: data in %s, fsync=%s%s", config.host, _absolute(root), config.fsync,
             f" every {config.flush_interval:g}s" if config.fsync == "interval" else "")
    counters = Counters()
    monitor, http_stop = Monitor(counters, shutdown), trio.Event()
    stats_send, stats_recv = trio.open_memory_channel[StatsRequest](16)
    async with trio.open_nursery() as root_nursery:
        try:
            if config.http_address is not None:  # first, so /healthz answers during recovery
                http_bound = await root_nursery.start(serve_monitoring, config.http_address, monitor, http_stop)
                if on_http_bound is not None:
                    on_http_bound(http_bound)
            await trio.to_thread.run_sync(make_root, root, config.dir_mode)  # durably: parents fsynced
            async with trio.open_nursery() as topics_nursery:
                registry = monitor.state = Registry(config, topics_nursery, counters)
                try:
                    await registry.open_existing()
                    await root_nursery.start(run_stats_task, stats_recv, config, counters, registry.views,
                                             lambda: registry.host)
                    await _serve_connections(config, registry, stats_send, counters, shutdown, task_status)
                finally:
                    registry.close_inputs()
        finally:
            stats_send.close()
            http_stop.set()
        log.info("shut down cleanly; every acknowledged batch is on disk")


async def _serve_connections(
    config: ServerConfig,
    registry: Registry,
    stats: trio.MemorySendChannel[StatsRequest],
    counters: Counters,
    shutdown: trio.Event | None,
    task_status: trio.TaskStatus[tuple[str, int]],
) -> None:
    host, port = config.address
    listeners = await trio.open_tcp_listeners(port, host=host)
    addr = listeners[0].socket.getsockname()
    bound: tuple[str, int] = (addr[0], addr[1])
    registry.host = f"{bound[0]}:{bound[1]}"
    conns = _Connections()

    def closed(c: Connection) -> None:
        counters.conns_active -= 1
        conns.remove(c)

    async def handle(stream: trio.SocketStream) -> None:
        if counters.conns_active >= config.max_connections:
            counters.conns_refused += 1
            with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(b"ERR too many connections\r\n")
            await stream.aclose()
            return
        counters.conns_active += 1
        counters.conns_total += 1
        c = Connection(stream, registry, stats, counters, closed)
        conns.add(c)
        await c.run()

    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as accept:
            accept.start_soon(partial(trio.serve_listeners, handle, listeners, handler_nursery=handlers))
            log.info("listening on %s:%d, data in %s, fsync=%s%s", bound[0], bound[1], _absolute(registry.root),
                     config.fsync, f" every {config.flush_interval:g}s" if config.fsync == "interval" else "")
            registry.accepting = True
            task_status.started(bound)
            if shutdown is None:
                await trio.sleep_forever()
            else:
                await shutdown.wait()
            registry.accepting = False
            log.info("shutting down: no new connections; %d open get %gs to finish",
                     len(conns.open), config.shutdown_timeout)
            accept.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        for c in list(conns.open):
            c.stop_reading()
        with trio.move_on_after(config.shutdown_timeout) as cs:
            await conns.empty.wait()
        if cs.cancelled_caught:
            log.warning("%d connections still busy after %gs: closing them", len(conns.open),
                        config.shutdown_timeout)
        handlers.cancel_scope.cancel()


async def run(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (the CLI's entry).

    A second signal during the graceful shutdown skips the grace period; topics
    still fsync before the process exits.
    """
    shutdown = trio.Event()
    serve_scope = trio.CancelScope()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    if shutdown.is_set():
                        log.warning("second %s: closing connections now", signal.Signals(signum).name)
                        serve_scope.cancel()
                        return
                    log.info("received %s", signal.Signals(signum).name)
                    shutdown.set()

            nursery.start_soon(watch)
            with serve_scope:
                await serve(config, shutdown=shutdown)
            nursery.cancel_scope.cancel()
