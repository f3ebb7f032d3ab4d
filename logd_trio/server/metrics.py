"""What ``--http-host`` serves: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

Nothing is counted for Prometheus on the hot path.  A scrape copies the
server's own counters (:class:`~logd_trio.server.stats.Counters`), its
histograms and the topics' state into a :class:`Snapshot` on the Trio thread
(plain numbers: well under a millisecond for a thousand topics), then builds
the metric families and the text from that copy in a worker thread, so that
formatting (tens of milliseconds for a thousand topics) never stalls the
event loop.  Each server has its own ``CollectorRegistry``, so several
servers in one process (as in the tests) never share or clash over a metric;
a collector added to it runs in that worker thread and must not read live
server state there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from logd_trio._version import __version__
from logd_trio.server.histogram import Histogram
from logd_trio.server.http import Request, Response, serve_http
from logd_trio.server.stats import COMMANDS, Counters
from logd_trio.server.topic import Topic

__all__ = ["ERROR_KINDS", "Monitor", "ServerState", "Snapshot", "serve_monitoring"]

log = logging.getLogger("logd_trio.server.metrics")

# Kinds of logd_errors_total that always appear (others appear once counted).
ERROR_KINDS: Final = ("corrupt", "not_found", "protocol", "refused", "storage", "timeout", "too_many_connections")



class ServerState(Protocol):
    """What the monitor reads of the server (the app's topic registry)."""

    @property
    def topics(self) -> Mapping[str, Topic]: ...

    @property
    def accepting(self) -> bool: ...


# name, head, first, bytes, fsyncs, read-only: a plain tuple, the cheapest to make a thousand of
TopicSnapshot = tuple[str, int, int, int, int, bool]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every number of one scrape, copied on the Trio thread."""

    requests: dict[str, int]
    errors: dict[str, int]
    error_kinds: dict[str, int]
    bytes_in: int
    bytes_out: int
    conns_active: int
    conns_total: int
    conns_refused: int
    longpoll_waiting: int
    batch_latency: Histogram
    read_latency: Histogram
    fsync_latency: Histogram
    batches_per_fsync: Histogram
    topics: tuple[TopicSnapshot, ...]
    ready: bool
    version: str
    replication: dict[str, int]

    @classmethod
    def take(cls, c: Counters, state: ServerState | None, conns: int, ready: bool, version: str) -> Snapshot:
        h = c.histograms
        topics = state.topics if state is not None else {}
        return cls(
            dict(c.requests), dict(c.errors), dict(c.error_kinds), c.bytes_in, c.bytes_out, conns,
            c.conns_total, c.conns_refused, c.longpoll_waiting, h.batch_latency.copy(), h.read_latency.copy(),
            h.fsync_latency.copy(), h.batches_per_fsync.copy(),
            tuple([(n, t.visible_head, t.first, t.log.head - t.first, t.fsyncs, t.failed is not None)
                   for n, t in topics.items()]),
            ready, version, dict(c.replica_gauges()))


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if le == float("inf") else repr(le), float(n)) for le, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


def families(s: Snapshot) -> Iterator[Metric]:
    """The metric families of one snapshot (any thread)."""
    total = CounterMetricFamily("logd_requests", "Requests received, by command.", labels=["command"])
    errs = CounterMetricFamily("logd_request_errors", "Requests answered with ERR, by command "
                               "(succeeded = logd_requests_total - this).", labels=["command"])
    for cmd in sorted(set(COMMANDS) | set(s.requests)):
        total.add_metric([cmd], s.requests.get(cmd, 0))
        errs.add_metric([cmd], s.errors.get(cmd, 0))
    yield total
    yield errs
    yield CounterMetricFamily("logd_received_bytes", "Bytes read from client connections.", value=s.bytes_in)
    yield CounterMetricFamily("logd_sent_bytes", "Bytes written to client connections (replies and "
                              "READ/TAIL frames).", value=s.bytes_out)
    yield GaugeMetricFamily("logd_connections", "Client connections open now.", value=s.conns_active)
    yield CounterMetricFamily("logd_connections_accepted", "Client connections accepted.", value=s.conns_total)
    yield CounterMetricFamily("logd_connections_refused", "Connections refused at --max-connections.",
                              value=s.conns_refused)
    yield GaugeMetricFamily("logd_longpolls_waiting", "Long-poll READs waiting for data now.",
                            value=s.longpoll_waiting)
    errors = CounterMetricFamily("logd_errors", "Errors by kind (see docs/operations.md).", labels=["kind"])
    kinds = dict.fromkeys(ERROR_KINDS, 0) | s.error_kinds
    kinds["too_many_connections"] = s.conns_refused
    for kind, n in sorted(kinds.items()):
        errors.add_metric([kind], n)
    yield errors
    yield _histogram("logd_batch_latency_seconds", "From a BATCH handed to its topic to its acknowledgement "
                     "(written, and fsynced with --fsync always).", s.batch_latency)
    yield _histogram("logd_read_latency_seconds", "READ/TAIL from planning to the last byte handed to the "
                     "socket (a long-poll's wait excluded).", s.read_latency)
    yield _histogram("logd_fsync_latency_seconds", "One group-commit fsync of a topic (data, index, "
                     "directory), as the topic waited for it.", s.fsync_latency)
    yield _histogram("logd_batches_per_fsync", "Batches made durable by one fsync.", s.batches_per_fsync)
    yield GaugeMetricFamily("logd_topics", "Topics served.", value=len(s.topics))
    head = GaugeMetricFamily("logd_topic_head", "Offset after the last acknowledged batch (TOPICS' head).",
                             labels=["topic"])
    first = GaugeMetricFamily("logd_topic_first", "Offset of the oldest batch kept (TOPICS' first).",
                              labels=["topic"])
    size = GaugeMetricFamily("logd_topic_bytes", "Bytes of batches in the topic's partition files "
                             "(index files excluded).", labels=["topic"])
    fsyncs = CounterMetricFamily("logd_topic_fsyncs", "Group-commit fsyncs of the topic.", labels=["topic"])
    readonly = GaugeMetricFamily("logd_topic_read_only", "1 when the topic refuses writes after an I/O error.",
                                 labels=["topic"])
    for name, t_head, t_first, t_bytes, t_fsyncs, t_read_only in sorted(s.topics):
        head.add_metric([name], t_head)
        first.add_metric([name], t_first)
        size.add_metric([name], t_bytes)
        fsyncs.add_metric([name], t_fsyncs)
        readonly.add_metric([name], int(t_read_only))
    yield from (head, first, size, fsyncs, readonly)
    yield from _replication(s.replication)
    yield GaugeMetricFamily("logd_ready", "1 when /readyz answers 200.", value=int(s.ready))
    info = GaugeMetricFamily("logd_build_info", "Always 1; the version in a label.", labels=["version"])
    info.add_metric([s.version], 1)
    yield info


# STATS' replication.<key> as metrics: (name, kind, help).  See docs/replication.md.
_REPLICATION: Final = {
    "bytes_fetched": ("logd_replication_fetched_bytes", "counter", "Frame bytes this follower fetched and stored."),
    "bytes_served": ("logd_replication_served_bytes", "counter", "Frame bytes FETCH replies sent to followers."),
    "lag_bytes": ("logd_replication_lag_bytes", "gauge", "A follower: bytes behind the leader's heads; a "
                  "leader: the furthest follower's bytes behind on one topic."),
    "lag_ms": ("logd_replication_lag_seconds", "gauge", "A leader: the longest a follower has not been caught up."),
    "insync": ("logd_replication_insync", "gauge", "A leader: nodes in the in-sync set, itself included."),
    "acks_waiting": ("logd_replication_acks_waiting", "gauge", "BATCH replies waiting for followers (--acks all)."),
    "halted": ("logd_replication_halted", "gauge", "1 when this follower refuses its leader's history."),
}


def _replication(values: dict[str, int]) -> Iterator[Metric]:
    for key, (name, kind, doc) in _REPLICATION.items():
        if key in values:
            value = values[key] / 1000 if key == "lag_ms" else values[key]
            yield (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, value=value)


class _SnapshotCollector(Collector):
    """Yields the families of the snapshot the current scrape took (scrapes are serialised)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        if self.snapshot is not None:
            yield from families(self.snapshot)


class Monitor:
    """The monitoring endpoints of one server; ``state`` is set once its topics exist."""

    def __init__(self, counters: Counters, shutdown: trio.Event | None) -> None:
        self.counters = counters
        self.state: ServerState | None = None
        self.open_connections: Callable[[], int] = lambda: 0  # set by serve() once it has the stats task
        self.version = __version__
        self._shutdown = shutdown
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector()
        self.registry.register(self._collector)
        self._scrape_lock = trio.Lock()
        self._thread = trio.CapacityLimiter(1)  # its own: a scrape never waits behind fsyncs for a thread

    def not_ready(self) -> str | None:
        """Why ``/readyz`` fails (one line), or None when the server accepts writes on every topic."""
        if self._shutdown is not None and self._shutdown.is_set():
            return "shutting down"
        state = self.state
        if state is None or not state.accepting:
            return "starting: recovering topics"
        failed = sorted(name for name, t in state.topics.items() if t.failed is not None)
        if failed:
            return f"read-only after an I/O error: {', '.join(failed)}"
        return None

    def snapshot(self) -> Snapshot:
        return Snapshot.take(self.counters, self.state, self.open_connections(), self.not_ready() is None,
                             self.version)

    async def scrape(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics text and its content type (Prometheus text, or OpenMetrics if ``accept`` asks)."""
        encoder, content_type = choose_encoder(accept)
        async with self._scrape_lock:
            self._collector.snapshot = self.snapshot()
            try:
                body = await trio.to_thread.run_sync(encoder, self.registry, limiter=self._thread)
            finally:
                self._collector.snapshot = None
        return body, content_type

    async def handle(self, req: Request) -> Response:
        if req.path == "/metrics":
            body, content_type = await self.scrape(req.header("accept"))
            return Response(200, body, content_type)
        if req.path == "/healthz":
            return Response(200, b"ok\n")
        if req.path == "/readyz":
            why = self.not_ready()
            return Response(200, b"ready\n") if why is None else Response(503, f"not ready: {why}\n".encode())
        return Response(404, b"not found: try /metrics, /healthz or /readyz\n")


async def serve_monitoring(
    address: tuple[str, int],
    monitor: Monitor,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``monitor`` over HTTP on ``address`` until ``stop`` is set; reports the bound address."""
    async with trio.open_nursery() as nursery:
        bound: tuple[str, int] = await nursery.start(serve_http, address[0], address[1], monitor.handle)
        log.info("monitoring on http://%s:%d (/metrics, /healthz, /readyz)", bound[0], bound[1])
        task_status.started(bound)
        await stop.wait()
        nursery.cancel_scope.cancel()
