"""A follower's side: learn the leader's topics, and one fetcher task per topic copying its frames.

:func:`follow` runs for the server's lifetime (``serve --replicate-from``).
It polls the leader's ``TOPICS`` every second and starts a fetcher for each
new topic.  A fetcher holds one connection to the leader, asks with
``FETCH`` from the topic's durable end (its acknowledgement), queues the
frames of each reply through the topic's inbox (each item carries its exact
offset; the topic task stays the only appender and fsyncs
them in groups) and asks again once they are durable.  Lost connections are
retried with capped exponential backoff.  A leader that is this node itself,
or that is a follower, stops the server with :class:`ReplicationRefused`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from logd_trio.core.errors import BadReply, InvalidBatchError, LogdError, RequestError, StorageError
from logd_trio.core.fetch import FETCH_NEED_DATA, FetchError, FetchReply, FetchReplyParser, encode_fetch
from logd_trio.core.framing import parse_frame_header
from logd_trio.core.replies import NEED_DATA, ErrorReply, MokReply, ReplyKind, ReplyParser
from logd_trio.server.blocking import run_blocking
from logd_trio.server.config import ServerConfig
from logd_trio.server.registry import Registry
from logd_trio.server.replica.follower_log import FollowerLog, FollowerTopic
from logd_trio.server.replica.link import LinkRefused, open_link
from logd_trio.server.replica.state import ReplicationRefused
from logd_trio.server.storage.epochs import EpochFile
from logd_trio.server.storage.replica_log import OffsetMismatch, start_at, truncate_to
from logd_trio.server.topic import Append, Topic

__all__ = ["FETCH_MAX_BYTES", "FETCH_WAIT_MS", "Target", "follow"]

log = logging.getLogger("logd_trio.server.replica")

FETCH_MAX_BYTES = 1 << 20  # data per FETCH reply (at least one batch)
FETCH_WAIT_MS = 1000  # long-poll at the leader's end
TOPICS_POLL = 1.0  # seconds between looks at the leader's topic list
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0
_RECV = 256 * 1024


class _Retry(LogdError):
    """The leader refused this fetch for a reason worth retrying (logged, then backoff)."""


@dataclass(frozen=True, slots=True)
class Target:
    """The leader a follower copies: its address, and with ``clustered`` the epoch etcd gave it (a
    cluster's follower compares its logs with the leader's epochs first, and a refusal is retried:
    the cluster task moves the follower when the leader changes)."""

    host: str
    port: int
    label: str
    clustered: bool = False
    epoch: int = 0


def _fatal(reason: str, target: Target) -> bool:
    """A refusal no retry can mend: the wrong leader, or a log here that the leader does not have."""
    if target.clustered:
        return "own id" in reason
    return reason.startswith("not leader") or "own id" in reason or "beyond the leader's head" in reason


async def _mok(stream: trio.abc.Stream, request: bytes, limit: float) -> bytes:
    """Send ``request`` (a line) and return its ``MOK`` body, within ``limit`` seconds; an ``ERR``
    is a :class:`_Retry`, anything else a :class:`BadReply`."""
    what = request.split(b" ", 1)[0].strip().decode("ascii", "replace")
    with trio.fail_after(limit):
        await stream.send_all(request)
        parser = ReplyParser(max_reply=1 << 20)
        while True:
            reply = parser.next_reply(ReplyKind.MOK)
            if isinstance(reply, MokReply):
                return reply.body
            if isinstance(reply, ErrorReply):
                raise _Retry(f"{what} refused: {reply.reason}")
            if reply is not NEED_DATA:
                raise BadReply(f"unexpected reply to {what}: {reply!r}")
            data = await stream.receive_some(_RECV)
            if not data:
                raise BadReply("the leader closed the connection")
            parser.receive_data(data)


async def _leader_topics(host: str, port: int, limit: float, config: ServerConfig) -> list[str]:
    stream = await open_link(host, port, config)  # TLS and AUTH as configured (link.py)
    async with stream:
        body = await _mok(stream, b"TOPICS\r\n", limit)
    return [line.split(b":")[0].decode("ascii") for line in body.split(b"\r\n") if line]


async def follow(registry: Registry, target: Target | None = None) -> None:
    """Copy every topic of the leader (``target``, by default ``replicate_from``) until cancelled."""
    config = registry.config
    if target is None:
        addr = config.leader_address
        assert addr is not None
        target = Target(addr[0], addr[1], config.replicate_from)
    host, port = target.host, target.port
    state = registry.replica
    state.leader_topics, state.synced_topics = None, set()
    timeout = config.timeout or 15.0
    backoff = BACKOFF_MIN
    started: set[str] = set()
    async with trio.open_nursery() as nursery:
        while True:
            try:
                names = await _leader_topics(host, port, timeout, config)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, BadReply, _Retry, LinkRefused) as e:
                log.warning("leader %s: cannot list topics: %s; retrying in %.2fs", target.label, e, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            state.leader_topics = set(names)
            for name in names:
                if name not in started:
                    started.add(name)
                    nursery.start_soon(_follow_topic, registry, name, target)
            await trio.sleep(TOPICS_POLL)


async def _follow_topic(registry: Registry, name: str, target: Target) -> None:
    backoff = BACKOFF_MIN
    while True:
        try:
            topic = await registry.get_or_create(name)
        except (RequestError, StorageError) as e:
            log.error("topic %s: cannot replicate it here: %s", name, e)
            return
        try:
            await _fetch_loop(registry, topic, target)
        except trio.ClosedResourceError:
            return  # shutting down: the topic's input is closed
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, BadReply, _Retry, StorageError,
                LinkRefused) as e:
            log.warning("topic %s: replication from %s interrupted: %s; retrying in %.2fs", name,
                        target.label, e, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        backoff = BACKOFF_MIN


def _start_over(flog: FollowerLog, ef: EpochFile, start: int) -> None:
    """Blocking: copy the whole log aside, empty it and make it start at ``start`` (the leader's first)."""
    truncate_to(flog, flog.first)
    ef.truncate(0)
    start_at(flog, start)


def _truncate(flog: FollowerLog, ef: EpochFile, end: int) -> None:
    truncate_to(flog, end)
    ef.truncate(end)


async def _cut(topic: Topic, truncate: Callable[[], object]) -> None:
    """Cut with no append of this node's last leadership pending (FollowerTopic.cut)."""
    assert isinstance(topic, FollowerTopic)
    await topic.cut(truncate)


def _is_empty(flog: FollowerLog) -> bool:
    return flog.head == flog.first


async def _receive(stream: trio.abc.Stream, parser: FetchReplyParser) -> FetchReply | FetchError:
    while True:
        reply = parser.next_reply()
        if reply is not FETCH_NEED_DATA:
            assert isinstance(reply, FetchReply | FetchError)
            return reply
        data = await stream.receive_some(_RECV)
        if not data:
            raise BadReply("the leader closed the connection")
        parser.receive_data(data)


async def _fetch_loop(registry: Registry, topic: Topic, target: Target) -> None:
    config = registry.config
    state = registry.replica
    flog = topic.log
    if not isinstance(flog, FollowerLog):
        raise ReplicationRefused(f"topic {topic.name} is not a follower's topic")
    name = topic.name
    wait = FETCH_WAIT_MS / 1000 + (config.timeout or 15.0)
    parser = FetchReplyParser(max_bytes=FETCH_MAX_BYTES + config.batch_size)
    stream = await open_link(target.host, target.port, config)
    async with stream:
        epoch = target.epoch
        if target.clustered:
            if epoch <= 0:
                raise _Retry("no leader epoch known")  # a cluster's fetch always carries one (fencing)
            await reconcile(stream, registry, topic, wait)
            state.reconciled(name)
        leader_first = 0
        wait_ms = 0  # the first answer at once: it tells how far the leader is
        while True:
            offset = max(topic.visible_head, flog.first)  # the durable end (the first after a start-over)
            if offset < leader_first and _is_empty(flog):
                offset = leader_first  # joined after the leader's retention: start where the leader starts
            asked = trio.current_time()
            with trio.fail_after(wait):
                await stream.send_all(encode_fetch(state.node_id, epoch, name, offset, FETCH_MAX_BYTES, wait_ms))
                wait_ms = FETCH_WAIT_MS
                reply = await _receive(stream, parser)
            if isinstance(reply, FetchError):
                if _fatal(reply.reason, target):
                    raise ReplicationRefused(f"leader {target.label}: {reply.reason}")
                if reply.reason.startswith("fenced"):
                    log.info("topic %s: the leader moved to a new epoch (%s)", name, reply.reason)
                    if target.clustered or epoch == 0:  # reconnect (with backoff): the log is compared with
                        raise _Retry(f"fenced: {reply.reason}")  # the leader's epochs again; a cluster
                    epoch = 0  # fences epoch 0, so a plain follower of a cluster node must not spin
                    continue
                raise _Retry(f"the leader refused FETCH at {offset}: {reply.reason}")
            h = reply.header
            if h.leader_epoch < state.epoch:
                raise _Retry(f"the leader answers with epoch {h.leader_epoch}, older than epoch {state.epoch} "
                             "this node already saw (a stale leader?)")
            if h.leader_epoch > state.epoch:
                await run_blocking(state.note_epoch, h.leader_epoch)
            epoch = h.leader_epoch
            leader_first = h.first
            if not reply.data:
                if offset < h.first and not _is_empty(flog):
                    log.warning("topic %s: this follower's log ends at %d, before the leader's first offset %d "
                                "(removed by retention): its partitions are copied aside (.log.corrupt-*) and "
                                "it starts again at %d", name, offset, h.first, h.first)
                    ef = state.epochs[name]
                    await _cut(topic, functools.partial(_start_over, flog, ef, h.first))
                    continue
                if offset >= h.head:
                    state.synced_topics.add(name)  # caught up with this leader once
                if h.first == h.head == offset and trio.current_time() - asked < FETCH_WAIT_MS / 2000:
                    # an empty topic the leader did not long-poll (nothing to wait on): ask again later.
                    # After a long poll ask again at once: a follower silent for longer than the
                    # leader's --replica-lag would leave the in-sync set over an idle topic.
                    await trio.sleep(FETCH_WAIT_MS / 1000)
                continue
            with trio.CancelScope(shield=True):  # a follower that stops (to lead) lets the reply land first
                await _store(registry, topic, reply)
            if h.offset + len(reply.data) >= h.head:
                state.synced_topics.add(name)


async def _settle(items: list[Append]) -> None:
    """After a bad reply: let what was queued land (or fail its offset check)."""
    if items:
        await items[-1].done.wait()


async def _store(registry: Registry, topic: Topic, reply: FetchReply) -> None:
    """Queue the reply's frames at their offsets and wait until they are durable here."""
    h = reply.header
    ef = registry.replica.epochs[topic.name]
    if h.batch_epoch != ef.latest:
        await run_blocking(ef.assign, h.batch_epoch, h.offset)  # before the epoch's first batch
    data = reply.data
    starts = set(h.starts)
    at, offset = 0, h.offset
    items: list[Append] = []
    try:
        while at < len(data):
            fh = parse_frame_header(data, at)
            if fh is None or at + fh.frame_len > len(data):
                raise BadReply(f"topic {topic.name}: a torn frame in the FETCH reply at {offset}")
            items.append(await topic.append(data[at:at + fh.frame_len], fh.count, (offset, offset in starts, h.first)))
            offset += fh.frame_len
            at += fh.frame_len
    except InvalidBatchError as e:
        await _settle(items)
        raise BadReply(f"topic {topic.name}: a bad frame in the FETCH reply at {offset}: {e}") from None
    except BadReply:
        await _settle(items)
        raise
    if items:
        await items[-1].done.wait()
    failed = next((i.error for i in items if i.error is not None), None)
    if failed is not None:
        raise StorageError(str(failed))


async def _epochs(stream: trio.abc.Stream, name: str, limit: float) -> dict[str, object]:
    raw = await _mok(stream, b"EPOCHS %s\r\n" % name.encode(), limit)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BadReply(f"EPOCHS: not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadReply("EPOCHS: expected an object")
    return body


def divergence(mine: list[tuple[int, int]], theirs: list[tuple[int, int]], their_head: int) -> int | None:
    """Where this log stops matching the leader's (None: nowhere we know of), by the leader-epoch rule
    (as in Kafka): take the newest leader epoch E not above this log's newest; this log matches up to
    where E ends on the leader, and at most up to where this log's own next epoch after E starts.
    Cut there and look again, until nothing changes."""
    if not mine:
        return None
    cut: int | None = None
    while mine:
        latest = mine[-1][0]
        shared: int | None = None  # E: the leader's newest epoch not above ours (None: all are newer)
        end = theirs[0][1] if theirs else their_head
        for i, (e, _) in enumerate(theirs):
            if e <= latest:
                shared, end = e, theirs[i + 1][1] if i + 1 < len(theirs) else their_head
        own_next = next((s for e, s in mine if shared is None or e > shared), None)
        if own_next is not None:
            end = min(end, own_next)
        cut = end if cut is None else min(cut, end)
        kept = [(e, s) for e, s in mine if s < cut]
        if kept == mine:
            break
        mine = kept
    return cut


async def reconcile(stream: trio.abc.Stream, registry: Registry, topic: Topic, limit: float) -> None:
    """After a leader change: cut what this log holds beyond the new leader's history (copied aside,
    ``.log.corrupt-*``): a tail no in-sync set acknowledged, written by a leader that lost its place."""
    flog = topic.log
    assert isinstance(flog, FollowerLog)
    ef = registry.replica.epochs[topic.name]
    for _ in range(4):
        body = await _epochs(stream, topic.name, limit)
        raw, head = body.get("epochs"), body.get("head")
        if not isinstance(raw, list) or not isinstance(head, int):
            raise BadReply("EPOCHS: expected epochs and head")
        try:
            theirs = [(int(e), int(s)) for e, s in raw]
        except (TypeError, ValueError, OverflowError):
            raise BadReply(f"EPOCHS: expected [epoch, start] pairs, got {raw[:3]!r}") from None
        end = divergence(ef.entries, theirs, head)
        if end is None or end >= flog.head:
            return
        log.warning("topic %s: this node's log (to %d, epoch %d) goes beyond the leader's history (epoch %d ends "
                    "at %d there): the rest is copied aside (.log.corrupt-*) and cut", topic.name, flog.head,
                    ef.latest, ef.epoch_at(end) if end > flog.first else 0, end)
        try:
            if end < flog.first:
                raise OffsetMismatch(f"offset {end} before the log's first {flog.first}")
            await _cut(topic, functools.partial(_truncate, flog, ef, end))
        except OffsetMismatch as e:
            log.warning("topic %s: cannot cut at %d (%s): the whole log is copied aside", topic.name, end, e)
            await _cut(topic, functools.partial(_start_over, flog, ef, max(end, 0)))
