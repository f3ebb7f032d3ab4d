"""Server counters and the stats task that answers STATS, CONFIG and TOPICS.

Counters are plain integers bumped by the connection tasks (one Trio thread,
so no locks).  The stats task owns the formatting: connections hand it a
request and a one-shot slot and go on with their next request.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping

import trio

from logd_trio.core import requests as p
from logd_trio.server.config import ServerConfig, format_duration
from logd_trio.server.histogram import Histograms

__all__ = ["Counters", "StatsRequest", "run_stats_task"]

# Commands whose requests.* / errors.* keys always appear (Go's names).
COMMANDS = ("batch", "close", "config", "ping", "read", "stats", "tail", "topics")


class Counters:
    """Every number STATS reports that connections and topics update."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.conns_active = 0
        self.conns_total = 0
        self.conns_refused = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.topics_disallowed = 0
        self.longpoll_waiting = 0
        self.error_kinds: collections.Counter[str] = collections.Counter()  # for /metrics: logd_errors_total
        self.histograms = Histograms()


class StatsRequest:
    __slots__ = ("done", "reply", "request")

    def __init__(self, request: p.Stats | p.Config | p.Topics) -> None:
        self.request = request
        self.reply = b""
        self.done = trio.Event()


class TopicView:
    """What the stats task needs to know of one topic."""

    __slots__ = ("first", "fsyncs", "head", "synced_batches")

    def __init__(self, first: int, head: int, fsyncs: int, synced_batches: int) -> None:
        self.first = first
        self.head = head
        self.fsyncs = fsyncs
        self.synced_batches = synced_batches


def format_stats(counters: Counters, topics: Mapping[str, TopicView]) -> bytes:
    c = counters
    values: dict[str, int | str] = {
        "bytes.in": c.bytes_in,
        "bytes.out": c.bytes_out,
        "conns.active": c.conns_active,
        "conns.total": c.conns_total,
        "conns.refused": c.conns_refused,
        "requests.total": sum(c.requests.values()),
        "errors.total": sum(c.errors.values()),
        "topics.disallowed": c.topics_disallowed,
        "topics.total": len(topics),
        "longpoll.waiting": c.longpoll_waiting,
        "errors.protocol": c.errors["protocol"],
    }
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


async def run_stats_task(
    requests: trio.MemoryReceiveChannel[StatsRequest],
    config: ServerConfig,
    counters: Counters,
    topics: Callable[[], Mapping[str, TopicView]],
    host: Callable[[], str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer STATS/CONFIG/TOPICS until the channel closes."""
    async with requests:
        task_status.started()
        async for req in requests:
            if isinstance(req.request, p.Config):
                req.reply = p.reply_mok(format_config(config, host()))
            elif isinstance(req.request, p.Stats):
                req.reply = p.reply_mok(format_stats(counters, topics()))
            else:
                req.reply = p.reply_mok(format_topics(topics()))
            req.done.set()
