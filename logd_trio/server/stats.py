"""The server's numbers and the stats task that answers STATS, CONFIG and TOPICS.

:class:`Counters` are plain integers that connections and the listener bump (one
Trio thread, so no locks).  Everything else STATS reports is *sampled* when a
request is answered, from the one place that owns it: topic heads and fsync
counts from the registry, the open connections from the listener's admission
control, the bound address from the listener.  Nothing is copied, so nothing
can drift.  Connections hand the task a request and a one-shot slot and go on
with their next request.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Final

import trio

from logd_trio._version import __version__
from logd_trio.core import requests as p
from logd_trio.server.config import ServerConfig, format_duration
from logd_trio.server.histogram import Histograms

__all__ = ["Counters", "Stats", "StatsRequest", "TopicView"]

log = logging.getLogger("logd_trio.server.stats")

# Requests waiting for the stats task; a connection that finds it full waits (backpressure).
QUEUE_SIZE: Final = 16

# Commands whose requests.* / errors.* keys always appear (Go's names).
COMMANDS = ("batch", "close", "config", "delete", "ping", "read", "stats", "tail", "topics")


class Counters:
    """The event counts STATS reports, bumped where the events happen."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.conns_total = 0
        self.conns_refused = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.topics_disallowed = 0
        self.longpoll_waiting = 0
        self.error_kinds: collections.Counter[str] = collections.Counter()  # for /metrics: logd_errors_total
        self.histograms = Histograms()
        self.fetch_bytes_in = 0  # a follower: frame bytes its fetches received
        self.fetch_bytes_out = 0  # a leader: frame bytes its FETCH replies carried
        # replication's sampled numbers (lag, in-sync size, ...): ReplicaState sets it (replica/report.py)
        self.replica_gauges: Callable[[], Mapping[str, int]] = _no_gauges


def _no_gauges() -> Mapping[str, int]:
    return {}


class StatsRequest:
    __slots__ = ("done", "reply", "request")

    def __init__(self, request: p.Stats | p.Config | p.Topics) -> None:
        self.request = request
        self.reply = b""
        self.done = trio.Event()


class TopicView:
    """What the stats task needs to know of one topic."""

    __slots__ = ("batches", "bytes", "first", "fsyncs", "head", "last_append", "synced_batches")

    def __init__(self, first: int, head: int, fsyncs: int, synced_batches: int, *, bytes_: int = 0,
                 batches: int = 0, last_append: float = 0.0) -> None:
        self.first = first
        self.head = head
        self.fsyncs = fsyncs
        self.synced_batches = synced_batches
        self.bytes = bytes_  # of frames in the partition files
        self.batches = batches  # in the partition files
        self.last_append = last_append  # unix time of the last write to the head partition; 0.0: none


def format_stats(counters: Counters, topics: Mapping[str, TopicView], connections: int) -> bytes:
    c = counters
    values: dict[str, int | str] = {
        "version": __version__,
        "bytes.in": c.bytes_in,
        "bytes.out": c.bytes_out,
        "conns.active": connections,
        "conns.total": c.conns_total,
        "conns.refused": c.conns_refused,
        "requests.total": sum(c.requests.values()),
        "errors.total": sum(c.errors.values()),
        "topics.disallowed": c.topics_disallowed,
        "topics.total": len(topics),
        "longpoll.waiting": c.longpoll_waiting,
        "errors.protocol": c.errors["protocol"],
        "auth.refused": c.error_kinds["not_allowed"],  # ERR not allowed (server/auth.py)
    }
    for key, value in c.replica_gauges().items():
        values[f"replication.{key}"] = value
    for cmd in COMMANDS:
        values[f"requests.{cmd}"] = c.requests[cmd]
        values[f"errors.{cmd}"] = c.errors[cmd]
    fsyncs = sum(t.fsyncs for t in topics.values())
    synced = sum(t.synced_batches for t in topics.values())
    values["fsyncs.total"] = fsyncs
    values["fsyncs.batches_per_fsync"] = f"{synced / fsyncs:.2f}" if fsyncs else "0"
    for name, t in topics.items():
        values[f"topic.{name}.head"] = t.head
        values[f"topic.{name}.first"] = t.first
        values[f"topic.{name}.fsyncs"] = t.fsyncs
        values[f"topic.{name}.bytes"] = t.bytes
        values[f"topic.{name}.batches"] = t.batches
        values[f"topic.{name}.last_append_ms"] = int(t.last_append * 1000)
    return b"".join(b"%s: %s\r\n" % (k.encode(), str(v).encode()) for k, v in sorted(values.items()))


def format_config(config: ServerConfig, host: str) -> bytes:
    # Exactly Go's four lines: Go clients and the conformance transcripts
    # expect nothing after MaxBatchSize.
    lines = [
        f"Host: {host}",
        f"Timeout: {format_duration(config.timeout)}",
        f"IdleTimeout: {format_duration(config.idle_timeout)}",
        f"MaxBatchSize: {config.batch_size}",
    ]
    return "".join(f"{line}\r\n" for line in lines).encode()


def format_topics(topics: Mapping[str, TopicView]) -> bytes:
    return b"".join(b"%s: %d %d\r\n" % (n.encode(), t.first, t.head) for n, t in sorted(topics.items()))


def _no_connections() -> int:
    return 0


class Stats:
    """The stats task and what it samples.

    ``serve`` creates it with the counters and the registry's topic views, the
    listener tells it the bound address and how to count open connections
    (:meth:`listening`), and connections send :class:`StatsRequest` items to
    :attr:`requests`.
    """

    def __init__(self, config: ServerConfig, counters: Counters,
                 topics: Callable[[], Mapping[str, TopicView]]) -> None:
        self.config = config
        self.counters = counters
        self._topics = topics
        self._connections: Callable[[], int] = _no_connections
        self._address = config.host
        self.requests, self._inbox = trio.open_memory_channel[StatsRequest](QUEUE_SIZE)

    @property
    def address(self) -> str:
        """The address CONFIG reports: the bound one once listening, else the configured one."""
        return self._address

    def listening(self, address: str, connections: Callable[[], int]) -> None:
        self._address = address
        self._connections = connections

    def open_connections(self) -> int:
        """Client connections open now (0 before listening)."""
        return self._connections()

    def answer(self, request: p.Stats | p.Config | p.Topics) -> bytes:
        """The reply to one request, from numbers sampled now."""
        if isinstance(request, p.Config):
            return p.reply_mok(format_config(self.config, self._address))
        if isinstance(request, p.Stats):
            return p.reply_mok(format_stats(self.counters, self._topics(), self._connections()))
        return p.reply_mok(format_topics(self._topics()))

    def close(self) -> None:
        """No more requests: :meth:`run` returns once it has answered the queued ones."""
        self.requests.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer STATS/CONFIG/TOPICS until :meth:`close`."""
        async with self._inbox:
            task_status.started()
            async for req in self._inbox:
                try:
                    req.reply = self.answer(req.request)
                except Exception:  # a bug must cost this request, never the server
                    log.exception("answering %s failed", type(req.request).__name__.upper())
                    req.reply = p.reply_err("internal error")
                req.done.set()
