"""A follower's side: learn the leader's topics, and one fetcher task per topic copying its frames.

:func:`follow` runs for the server's lifetime (``serve --replicate-from``).
It polls the leader's ``TOPICS`` every second and starts a fetcher for each
new topic.  A fetcher holds one connection to the leader, asks with
``FETCH`` from the topic's durable end (its acknowledgement), queues the
frames of each reply through the topic's inbox (each item carries its exact
offset; the topic task stays the only appender and fsyncs
them in groups) and asks again once they are durable.  Lost connections are
retried with capped exponential backoff, and so is a topic that cannot be
created here for now (e.g. out of file descriptors).  A leader that is this
node itself, or that is a follower, stops the server with
:class:`ReplicationRefused`.  A leader with another history (its data
directory's id differs from the one this node copied: e.g. it was restarted
with an empty directory), or whose log of a topic ends before this node's,
*halts* replication (:func:`halt`): nothing of this node's log is cut, it
keeps serving reads, logs once how to recover, and ``CLUSTER`` / STATS show it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from logd_trio.core.errors import BadReply, InvalidBatchError, LogdError, RequestError, StorageError
from logd_trio.core.fetch import FETCH_NEED_DATA, FetchError, FetchReply, FetchReplyParser, encode_fetch
from logd_trio.core.framing import parse_frame_header
from logd_trio.server.blocking import run_blocking
from logd_trio.server.registry import Registry
from logd_trio.server.replica.follower_log import FollowerLog, FollowerTopic
from logd_trio.server.replica.link import LinkRefused, open_link
from logd_trio.server.replica.marks import write_history
from logd_trio.server.replica.reconcile import _RECV, _cut, _mok, _Retry, _start_over, reconcile
from logd_trio.server.replica.state import ReplicaState, ReplicationRefused
from logd_trio.server.topic import Append, Topic

__all__ = ["FETCH_WAIT_MS", "Target", "follow", "halt"]

log = logging.getLogger("logd_trio.server.replica")

FETCH_WAIT_MS = 1000  # long-poll at the leader's end
TOPICS_POLL = 1.0  # seconds between looks at the leader's topic list
HALT_RETRY = 30.0  # seconds between looks at a halted leader's history (at most)
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0


class _Halt(LogdError):
    """The leader's log is not this node's: copy nothing more from it (:func:`halt`)."""


class _OtherHistory(_Halt):
    """The leader holds another history id: copying resumes once it holds this node's again."""


class _Halted:
    """Set by the task that halts replication: every fetcher then stops."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.resumable = False

    def set(self, e: _Halt) -> None:
        self.resumable = self.resumable or isinstance(e, _OtherHistory)
        self.event.set()


def halt(state: ReplicaState, leader: str, why: str, resumable: bool = True) -> None:
    """Stop copying from ``leader`` (the first reason is kept, logged once with how to recover)."""
    if state.halted is not None:
        return
    state.halted = why
    then = ("replication resumes by itself once the leader holds this node's history" if resumable
            else "then restart this node")
    log.error("replication halted: %s; nothing is cut or copied here, reads are still served. To recover, "
              "either stop the leader %s, replace its data directory with a copy of this node's and restart it, "
              "or restart this node with an empty data directory to take the leader's history; %s", why, leader, then)


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
    return reason.startswith("not leader") or "own id" in reason


async def _leader_topics(state: ReplicaState, target: Target, limit: float) -> list[str]:
    """The leader's topics (a plain follower checks the leader's history first: no topic of another
    history is created here)."""
    stream = await open_link(target.host, target.port, state.config)  # TLS and AUTH as configured (link.py)
    async with stream:
        if not target.clustered:
            await _check_history(stream, state, target, limit)
        body = await _mok(stream, b"TOPICS\r\n", limit)
    return [line.split(b":")[0].decode("ascii") for line in body.split(b"\r\n") if line]


async def follow(registry: Registry, target: Target | None = None) -> None:
    """Copy every topic of the leader (``target``, by default ``replicate_from``) until cancelled.
    A halt stops every fetcher; the leader's history is then looked at again (after 1 s, doubling up
    to ``HALT_RETRY`` seconds) and copying resumes once it is this node's again (the leader got a
    copy of this directory); a halt for batches the leader lacks stays until this node restarts."""
    config = registry.config
    if target is None:
        addr = config.leader_address
        assert addr is not None
        target = Target(addr[0], addr[1], config.replicate_from)
    state = registry.replica
    state.leader_topics, state.synced_topics = None, set()
    timeout = config.timeout or 15.0
    pause = 1.0
    while True:
        if state.halted is None:
            pause = 1.0
            halted = _Halted()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_list_topics, registry, target, nursery, halted)
                await halted.event.wait()
                nursery.cancel_scope.cancel()  # every fetcher stops: nothing more is copied from it
            if not halted.resumable:  # a leader lacking batches held here: the same id proves nothing
                await trio.sleep_forever()
        await trio.sleep(pause)
        pause = min(pause * 2, HALT_RETRY)
        with contextlib.suppress(OSError, trio.TooSlowError, trio.BrokenResourceError, BadReply, _Retry,
                                 LinkRefused, StorageError, _Halt):
            stream = await open_link(target.host, target.port, config)
            async with stream:
                await _check_history(stream, state, target, timeout)
            log.warning("replication from %s resumes: it holds this node's history again (was: %s)",
                        target.label, state.halted)
            state.halted = None


async def _list_topics(registry: Registry, target: Target, nursery: trio.Nursery, halted: _Halted) -> None:
    """Look at the leader's topics every second and start a fetcher for each new one."""
    state = registry.replica
    timeout = registry.config.timeout or 15.0
    backoff = BACKOFF_MIN
    started: set[str] = set()
    while True:
        try:
            names = await _leader_topics(state, target, timeout)
        except _Halt as e:
            halt(state, target.label, str(e), isinstance(e, _OtherHistory))
            halted.set(e)
            return
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, BadReply, _Retry, LinkRefused,
                StorageError) as e:  # StorageError: the history id could not be stored here
            log.warning("leader %s: cannot list topics: %s; retrying in %.2fs", target.label, e, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        backoff = BACKOFF_MIN
        state.leader_topics = set(names)
        for name in names:
            if name not in started:
                started.add(name)
                nursery.start_soon(_follow_topic, registry, name, target, halted)
        await trio.sleep(TOPICS_POLL)


async def _follow_topic(registry: Registry, name: str, target: Target, halted: _Halted | None = None) -> None:
    backoff = BACKOFF_MIN
    while True:
        try:
            topic = await registry.get_or_create(name)
        except RequestError as e:  # a rule of this node (--topics, --topics-whitelist): no retry mends it
            log.error("topic %s: not replicated here: %s", name, e)
            return
        except StorageError as e:  # e.g. out of descriptors: try again
            log.warning("topic %s: cannot create it here to replicate it: %s; retrying in %.2fs", name, e, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX * 5)
            continue
        try:
            await _fetch_loop(registry, topic, target)
        except trio.ClosedResourceError:
            return  # shutting down: the topic's input is closed
        except _Halt as e:
            halt(registry.replica, target.label, str(e), isinstance(e, _OtherHistory))
            if halted is not None:
                halted.set(e)
            return
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, BadReply, _Retry, StorageError,
                LinkRefused) as e:
            log.warning("topic %s: replication from %s interrupted: %s; retrying in %.2fs", name,
                        target.label, e, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        backoff = BACKOFF_MIN


async def _check_history(stream: trio.abc.Stream, state: ReplicaState, target: Target, limit: float) -> None:
    """A plain follower: the leader's history id (``CLUSTER``) must be the one this node copied; a
    node with none yet takes it.  Raises :class:`_Halt` for another one.  ``CLUSTER HISTORY``: a
    small reply, whatever the number of topics and followers."""
    try:
        body = json.loads(await _mok(stream, b"CLUSTER HISTORY\r\n", limit))
    except (ValueError, RecursionError) as e:
        raise BadReply(f"CLUSTER: not JSON: {e}") from None
    theirs = body.get("history") if isinstance(body, dict) else None
    if not isinstance(theirs, str) or not theirs:
        return  # an older leader: no id to compare
    if not state.history:
        await run_blocking(write_history, Path(state.config.workdir), theirs, state.config.file_mode)
        state.history = theirs
    elif theirs != state.history:
        raise _OtherHistory(f"the leader {target.label} holds another history (id {theirs}) than the one this node "
                    f"copied (id {state.history}): was it restarted with an empty or other data directory?")


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
    parser = FetchReplyParser(max_bytes=config.fetch_max_bytes + config.batch_size)
    stream = await open_link(target.host, target.port, config)
    async with stream:
        epoch = target.epoch
        if not target.clustered:
            await _check_history(stream, state, target, wait)
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
                await stream.send_all(encode_fetch(state.node_id, epoch, name, offset, config.fetch_max_bytes,
                                                 wait_ms))
                wait_ms = FETCH_WAIT_MS
                reply = await _receive(stream, parser)
            if isinstance(reply, FetchError):
                if _fatal(reply.reason, target):
                    raise ReplicationRefused(f"leader {target.label}: {reply.reason}")
                if "beyond the leader's head" in reply.reason and not target.clustered:
                    theirs = reply.reason.rsplit(" ", 1)[-1]
                    raise _Halt(f"the leader's log of {name} ends at {theirs}, this node's at {offset}: "
                                "the leader lacks batches this node holds")
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
            state.leader_heads[name] = h.head
            state.told(name, h.high_watermark)  # readers stop at min(this, what is stored here)
            if not reply.data:
                if offset < h.first and not _is_empty(flog):
                    log.warning("topic %s: this follower's log ends at %d, before the leader's first offset %d "
                                "(removed by retention): its partitions are copied aside (.log.corrupt-*) and "
                                "it starts again at %d", name, offset, h.first, h.first)
                    ef = state.epochs[name]
                    await _cut(state, topic, functools.partial(_start_over, flog, ef, h.first))
                    continue
                if isinstance(topic, FollowerTopic):
                    topic.follow_first(h.first)  # an idle leader's retention reaches a restarted follower
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
            state.counters.fetch_bytes_in += len(reply.data)  # once stored: a retried reply counts once
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
