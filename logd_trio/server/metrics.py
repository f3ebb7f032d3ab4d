"""What ``--http-host`` serves: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

Nothing is counted for Prometheus on the hot path: :class:`ServerCollector`
reads the server's own counters (:class:`~logd_trio.server.stats.Counters`),
its histograms and the topics' state when a scrape asks, on the Trio thread.
Each server has its own ``CollectorRegistry``, so several servers in one
process (as in the tests) never share or clash over a metric.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterator, Mapping
from typing import Final, Protocol

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from logd_trio.server.histogram import Histogram
from logd_trio.server.http import Request, Response, serve_http
from logd_trio.server.stats import COMMANDS, Counters
from logd_trio.server.topic import Topic

__all__ = ["ERROR_KINDS", "Monitor", "ServerState", "serve_monitoring"]

log = logging.getLogger("logd_trio.server.metrics")

# Kinds of logd_errors_total that always appear (others appear once counted).
ERROR_KINDS: Final = ("corrupt", "not_found", "protocol", "refused", "storage", "timeout", "too_many_connections")


def _version() -> str:
    try:
        return importlib.metadata.version("logd-trio")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


class ServerState(Protocol):
    """What the monitor reads of the server (the app's topic registry)."""

    @property
    def topics(self) -> Mapping[str, Topic]: ...

    @property
    def accepting(self) -> bool: ...


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if le == float("inf") else repr(le), float(n)) for le, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


class ServerCollector(Collector):
    """Builds every metric family from the server's live state at scrape time."""

    def __init__(self, monitor: Monitor) -> None:
        self._m = monitor

    def collect(self) -> Iterator[Metric]:
        m = self._m
        c = m.counters
        yield from self._requests(c)
        yield CounterMetricFamily("logd_received_bytes", "Bytes read from client connections.", value=c.bytes_in)
        yield CounterMetricFamily("logd_sent_bytes", "Bytes written to client connections (replies and "
                                  "READ/TAIL frames).", value=c.bytes_out)
        yield GaugeMetricFamily("logd_connections", "Client connections open now.", value=c.conns_active)
        yield CounterMetricFamily("logd_connections_accepted", "Client connections accepted.", value=c.conns_total)
        yield CounterMetricFamily("logd_connections_refused", "Connections refused at --max-connections.",
                                  value=c.conns_refused)
        yield GaugeMetricFamily("logd_longpolls_waiting", "Long-poll READs waiting for data now.",
                                value=c.longpoll_waiting)
        errors = CounterMetricFamily("logd_errors", "Errors by kind (see docs/operations.md).", labels=["kind"])
        kinds = dict.fromkeys(ERROR_KINDS, 0) | dict(c.error_kinds)
        kinds["too_many_connections"] = c.conns_refused
        for kind, n in sorted(kinds.items()):
            errors.add_metric([kind], n)
        yield errors
        h = c.histograms
        yield _histogram("logd_batch_latency_seconds", "From a BATCH handed to its topic to its acknowledgement "
                         "(written, and fsynced with --fsync always).", h.batch_latency)
        yield _histogram("logd_read_latency_seconds", "READ/TAIL from planning to the last byte handed to the "
                         "socket (a long-poll's wait excluded).", h.read_latency)
        yield _histogram("logd_fsync_latency_seconds", "One group-commit fsync of a topic (data, index, "
                         "directory), as the topic waited for it.", h.fsync_latency)
        yield _histogram("logd_batches_per_fsync", "Batches made durable by one fsync.", h.batches_per_fsync)
        yield from self._topics(m.state)
        ready = GaugeMetricFamily("logd_ready", "1 when /readyz answers 200.", value=0 if m.not_ready() else 1)
        yield ready
        info = GaugeMetricFamily("logd_build_info", "Always 1; the version in a label.", labels=["version"])
        info.add_metric([m.version], 1)
        yield info

    @staticmethod
    def _requests(c: Counters) -> Iterator[Metric]:
        total = CounterMetricFamily("logd_requests", "Requests received, by command.", labels=["command"])
        errs = CounterMetricFamily("logd_request_errors", "Requests answered with ERR, by command "
                                   "(succeeded = logd_requests_total - this).", labels=["command"])
        for cmd in sorted(set(COMMANDS) | set(c.requests)):
            total.add_metric([cmd], c.requests[cmd])
            errs.add_metric([cmd], c.errors[cmd])
        yield total
        yield errs

    @staticmethod
    def _topics(state: ServerState | None) -> Iterator[Metric]:
        topics = state.topics if state is not None else {}
        yield GaugeMetricFamily("logd_topics", "Topics served.", value=len(topics))
        head = GaugeMetricFamily("logd_topic_head", "Offset after the last acknowledged batch (TOPICS' head).",
                                 labels=["topic"])
        first = GaugeMetricFamily("logd_topic_first", "Offset of the oldest batch kept (TOPICS' first).",
                                  labels=["topic"])
        size = GaugeMetricFamily("logd_topic_bytes", "Bytes of batches in the topic's partition files "
                                 "(index files excluded).", labels=["topic"])
        fsyncs = CounterMetricFamily("logd_topic_fsyncs", "Group-commit fsyncs of the topic.", labels=["topic"])
        readonly = GaugeMetricFamily("logd_topic_read_only", "1 when the topic refuses writes after an I/O error.",
                                     labels=["topic"])
        for name, t in sorted(topics.items()):
            head.add_metric([name], t.visible_head)
            first.add_metric([name], t.first)
            size.add_metric([name], t.log.head - t.first)
            fsyncs.add_metric([name], t.fsyncs)
            readonly.add_metric([name], 0 if t.failed is None else 1)
        yield from (head, first, size, fsyncs, readonly)


class Monitor:
    """The monitoring endpoints of one server; ``state`` is set once its topics exist."""

    def __init__(self, counters: Counters, shutdown: trio.Event | None) -> None:
        self.counters = counters
        self.state: ServerState | None = None
        self.version = _version()
        self._shutdown = shutdown
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(self))

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

    def handle(self, req: Request) -> Response:
        if req.path == "/metrics":
            encoder, content_type = choose_encoder(req.header("accept"))
            return Response(200, encoder(self.registry), content_type)
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
