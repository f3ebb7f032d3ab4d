"""The server: the nursery tree of ARCHITECTURE.md.

::

    serve(config, task_status)        data directory locked first (lock.py)
     └ root nursery
        ├ monitoring HTTP server with --http-host (metrics.py, http.py; first, so
        │ /healthz answers during recovery; stops last)
        ├ stats task (stats.py: samples the numbers, answers STATS / CONFIG / TOPICS)
        └ topics nursery
           ├ one task per topic (registry.py; recovered before the listener opens)
           └ handlers nursery: one Connection per admitted socket (connection.py)
              └ accept nursery: one accept loop per bound socket (listener.py;
                limits.py: the fd budget and the connection caps)

Shutdown (``shutdown`` event set, e.g. by SIGINT/SIGTERM in :func:`run`):
stop accepting, stop reading new requests, give in-flight requests
``shutdown_timeout`` to be answered, then close every topic's input so each
topic drains, fsyncs and closes its files.  Cancelling :func:`serve` instead
skips the grace period but still fsyncs every topic.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import trio

from logd_trio._version import __version__
from logd_trio.server.admin import peer_of
from logd_trio.server.auth import Policy, load_policy
from logd_trio.server.blocking import run_blocking
from logd_trio.server.cluster.tls import etcd_context
from logd_trio.server.clustering import Clustering
from logd_trio.server.config import ServerConfig, join_host_port
from logd_trio.server.connection import Connection
from logd_trio.server.http import MAX_CONNECTIONS as HTTP_MAX_CONNECTIONS
from logd_trio.server.limits import FDS_PER_CONNECTION, Admission, FdBudget, fd_budget, raise_fd_limit
from logd_trio.server.listener import Listener, Served, exposed_addresses
from logd_trio.server.lock import DataDirLock
from logd_trio.server.metrics import Monitor, serve_monitoring
from logd_trio.server.registry import Registry
from logd_trio.server.replica.fetcher import follow
from logd_trio.server.replica.link import leader_context
from logd_trio.server.stats import Counters, Stats
from logd_trio.server.storage.files import make_root
from logd_trio.server.tls import HANDSHAKE_TIMEOUT, Accepted, plain_socket, server_context
from logd_trio.server.workers.pool import WorkerPool
from logd_trio.server.workers.sockets import reuseport_listeners

__all__ = ["run", "serve"]

log = logging.getLogger("logd_trio.server.app")
conn_log = logging.getLogger("logd_trio.server.connection")


def _absolute(path: Path) -> str:
    """For log lines: no file system access (cwd is known)."""
    return os.path.abspath(path)


def _fsync_text(config: ServerConfig) -> str:
    return config.fsync + (f" every {config.flush_interval:g}s" if config.fsync == "interval" else "")


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
    Raises the process's soft open-file limit to its hard limit, and raises
    :class:`~logd_trio.server.lock.DataDirLocked` if another server holds the
    data directory.
    """
    root = Path(config.workdir)
    tls = server_context(config)  # ConfigError before anything starts
    leader_context(config)  # the same for a follower's link to its leader
    if config.etcd:
        etcd_context(config)  # and for the links to etcd
    policy = load_policy(config.auth_file) if config.auth_file else None  # a small file, read once
    log.info("logd-trio %s starting on %s: data in %s, fsync=%s", __version__, config.host, _absolute(root),
             _fsync_text(config))
    # Two short steps before anything else, in a thread limiter of their own (so a
    # busy default limiter cannot hold them up): the directory, durably (parents
    # fsynced), and its lock.
    startup = trio.CapacityLimiter(1)
    await run_blocking(make_root, root, config.dir_mode, limiter=startup)
    lock = await run_blocking(DataDirLock.acquire, root, config.file_mode, limiter=startup)
    try:
        fd_limit = raise_fd_limit()  # before recovery opens every partition
        counters = Counters()
        monitor, http_stop = Monitor(counters, shutdown), trio.Event()
        async with trio.open_nursery() as root_nursery:
            try:
                if config.http_address is not None:  # first, so /healthz answers during recovery
                    http_bound = await root_nursery.start(serve_monitoring, config.http_address, monitor, http_stop)
                    if on_http_bound is not None:
                        on_http_bound(http_bound)
                async with trio.open_nursery() as topics_nursery:
                    registry = monitor.state = Registry(config, topics_nursery, counters)
                    stats = Stats(config, counters, registry.views)
                    monitor.open_connections = stats.open_connections
                    try:
                        await registry.open_existing()
                        await root_nursery.start(stats.run)
                        async with trio.open_nursery() as replication:  # a follower's fetchers (replica/)
                            replication.start_soon(registry.replica.marks.run)  # high-watermark checkpoints
                            if config.replicate_from:
                                replication.start_soon(follow, registry)
                            elif config.etcd:  # the cluster elects the leader (server/clustering.py)
                                replication.start_soon(Clustering(registry).run)
                            await _serve_connections(config, registry, stats, fd_limit, shutdown, task_status,
                                                     tls, policy)
                            replication.cancel_scope.cancel()
                    finally:
                        stats.close()
                        registry.close_inputs()
            finally:
                http_stop.set()
            log.info("shut down cleanly; every acknowledged batch is on disk")
    finally:
        lock.release()


def _fd_budget(config: ServerConfig, fd_limit: int | None, existing: int) -> FdBudget:
    """The descriptors for files and for connections (limits.py), and a log line when they are short.

    The reserve is for the worst case, ``--topics`` topics each with ``--partitions`` partitions
    open.  When the limit cannot afford it (1024 topics of 8 partitions need about 42 000), the
    server still serves: it is said at INFO while the topics that exist fit, at WARNING once not."""
    topics = max(config.topics, existing)
    http = HTTP_MAX_CONNECTIONS if config.http_address is not None else 0
    budget = fd_budget(fd_limit, max_connections=config.max_connections, topics=topics,
                       partitions=config.partitions, http_connections=http)
    if budget.shortfall:
        fixed = fd_budget(None, max_connections=1, topics=0, partitions=config.partitions, http_connections=http)
        per_topic = fd_budget(None, max_connections=1, topics=1, partitions=config.partitions,
                              http_connections=http).reserve - fixed.reserve
        fit = max(0, (budget.limit - budget.max_connections * FDS_PER_CONNECTION - fixed.reserve) // per_topic)
        log.log(logging.WARNING if existing > fit else logging.INFO,
                "open-file limit %d: %d topics of %d partitions could need %d descriptors (%d each, plus "
                "%d per connection); about %d topics fit (%d exist), at most %d connections; raise the limit "
                "(`ulimit -n`, systemd's LimitNOFILE) to %d, or lower --topics/--partitions", budget.limit,
                topics, config.partitions, topics * per_topic, per_topic, FDS_PER_CONNECTION, fit, existing,
                budget.max_connections, budget.limit + budget.shortfall + config.max_connections * FDS_PER_CONNECTION)
    elif budget.max_connections < config.max_connections:
        log.warning("open-file limit %d: at most %d connections (--max-connections %d lowered; %d descriptors "
                    "kept for partitions, indexes and fsync jobs)", budget.limit, budget.max_connections,
                    config.max_connections, budget.reserve)
    return budget


async def _serve_connections(
    config: ServerConfig,
    registry: Registry,
    stats: Stats,
    fd_limit: int | None,
    shutdown: trio.Event | None,
    task_status: trio.TaskStatus[tuple[str, int]],
    tls: ssl.SSLContext | None = None,
    policy: Policy | None = None,
) -> None:
    budget = _fd_budget(config, fd_limit, len(registry.topics))
    host, port = config.address
    if config.workers > 1:  # worker processes share the port (server/workers/)
        listeners = await reuseport_listeners(host, port, first=True)
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)
    bound = [listener.socket.getsockname() for listener in listeners]
    first: tuple[str, int] = (bound[0][0], bound[0][1])
    for addr in exposed_addresses(b[0] for b in bound):
        missing = [what for what, off in (("TLS: anyone on the path can read and change the traffic", tls is None),
                                          ("--auth-file: anyone who reaches the port can read and write every "
                                           "topic", not config.auth_file)) if off]
        if missing:
            log.warning("listening on %s, which other hosts can reach, without %s (see docs/security.md)", addr,
                        "; without ".join(missing))
    if tls is not None:
        log.info("TLS on (%s)", "client certificates required" if config.tls_client_ca else "server certificate")
    if policy is not None:
        log.info("auth file %s: %d principals; anonymous clients may %s", config.auth_file, len(policy.principals),
                 policy.anonymous.summary())
        if tls is None and exposed_addresses(b[0] for b in bound):
            log.warning("--auth-file without TLS: tokens cross the network in the clear")
    admission: Admission[Served] = Admission(budget.max_connections, config.max_connections_per_ip)

    def connection(stream: Accepted, on_close: Callable[[Served], None]) -> Connection:
        if not conn_log.isEnabledFor(logging.DEBUG):
            return Connection(stream, registry, stats.requests, stats.counters, on_close)
        peer = peer_of(plain_socket(stream.socket))  # -v: per-connection events
        conn_log.debug("connection from %s opened", peer)

        def closed(c: Served) -> None:
            on_close(c)
            conn_log.debug("connection from %s closed", peer)

        return Connection(stream, registry, stats.requests, stats.counters, closed)

    listener = Listener(listeners, admission, stats.counters, connection, tls=tls,
                        handshake_timeout=min(HANDSHAKE_TIMEOUT, config.timeout or HANDSHAKE_TIMEOUT), policy=policy)
    stats.listening(join_host_port(*first), admission.__len__)
    registry.replica.listening(join_host_port(*first))
    try:
        async with trio.open_nursery() as handlers:
            pool = WorkerPool(registry, listener) if config.workers > 1 else None
            if pool is not None:
                await handlers.start(pool.run, first[1], handlers)
            async with trio.open_nursery() as accept:
                accept.start_soon(listener.serve, handlers)
                log.info("listening on %s, data in %s, fsync=%s", join_host_port(*first), _absolute(registry.root),
                         _fsync_text(config))
                registry.accepting = True
                task_status.started(first)
                if shutdown is None:
                    await trio.sleep_forever()
                else:
                    await shutdown.wait()
                registry.accepting = False
                log.info("shutting down: no new connections; %d open get %gs to finish",
                         len(admission), config.shutdown_timeout)
                accept.cancel_scope.cancel()
            if pool is not None:  # their relayed requests are answered before the owner drains
                await pool.stop()
            await listener.close()
            with trio.move_on_after(config.shutdown_timeout):
                await listener.drain()
            if admission:
                log.warning("%d connections still busy after %gs: closing them", len(admission),
                            config.shutdown_timeout)
            handlers.cancel_scope.cancel()
    finally:
        await listener.close()


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
