"""Server behaviour over real sockets: group commit, pipelining, limits,
timeouts and long-poll in virtual time, restart, graceful shutdown."""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from logd_trio.server.storage import recovery, syscalls
from logd_trio.server.storage.topic_log import TopicLog
from logd_trio.server.topic import Topic

from ..harness import LocalServer, make_config, start_server
from ..wire import Wire, batch_request


def capture_topics(monkeypatch: pytest.MonkeyPatch) -> dict[str, Topic]:
    """Record every Topic the server opens (instrumentation, not a mock)."""
    seen: dict[str, Topic] = {}
    real_open = Topic.open.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Topic], root: Path, name: str, config: Any, now: int | None = None) -> Topic:
        t: Topic = real_open(cls, root, name, config, now)
        seen[name] = t
        return t

    monkeypatch.setattr(Topic, "open", classmethod(spy))
    return seen


async def test_group_commit_shares_fsyncs_and_never_acks_early(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = capture_topics(monkeypatch)
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="always"))
    # Create the topic, then hook its fsyncs: record the durable point.
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("gc", [b"first"]))
    assert await w.reply() == b"OK 0 1\r\n"
    durable = [0]
    tlog: TopicLog = topics["gc"].log
    tlog.on_fsync = lambda upto: durable.append(max(durable[-1], upto))
    fsyncs_before = tlog.fsync_count

    writers, per_writer = 8, 25
    early: list[tuple[int, int]] = []
    acked: list[tuple[int, bytes]] = []

    async def writer(i: int) -> None:
        c = await Wire.connect(srv.host, srv.port)
        reqs = [batch_request("gc", [b"w%d-b%d" % (i, j), b"x" * j]) for j in range(per_writer)]
        await c.send(b"".join(reqs))  # all pipelined in one write
        for req in reqs:
            line = await c.reply()
            assert line.startswith(b"OK "), line
            off = int(line.split()[1])
            end = off + len(req)
            if durable[-1] < end:  # the OK arrived before an fsync covered the batch
                early.append((off, durable[-1]))
            acked.append((off, req))
        await c.aclose()

    async with trio.open_nursery() as n:
        for i in range(writers):
            n.start_soon(writer, i)

    fsyncs = tlog.fsync_count - fsyncs_before
    assert len(acked) == writers * per_writer
    assert early == []
    assert 1 <= fsyncs < writers * per_writer  # shared fsyncs
    # every acknowledged batch reads back byte-identical at its offset
    for off, req in acked:
        await w.send(b"READ gc %d 1\r\n" % off)
        head, frames = await w.read_reply()
        assert head == b"OK %d 1\r\n" % off
        assert frames == [req]
    stats = await stat_map(w)
    assert int(stats["fsyncs.total"]) >= fsyncs
    assert float(stats["fsyncs.batches_per_fsync"]) > 1.0
    assert int(stats["topic.gc.head"]) == max(o + len(r) for o, r in acked)
    srv.scope.cancel()


async def stat_map(w: Wire) -> dict[str, str]:
    await w.send(b"STATS\r\n")
    body = (await w.reply()).split(b"\r\n", 1)[1]
    return dict(line.decode().split(": ", 1) for line in body.split(b"\r\n") if line)


async def test_pipelined_requests_answered_in_order(server: LocalServer) -> None:
    w = await Wire.connect(server.host, server.port)
    reqs = []
    for i in range(200):
        reqs.append(batch_request("pipe", [b"m%d" % i]))
        reqs.append(b"PING\r\n")
    reqs.append(b"READ pipe 0 1\r\n")
    await w.send(b"".join(reqs))
    off = 0
    for i in range(200):
        assert await w.reply() == b"OK %d 1\r\n" % off
        assert await w.reply() == b"PONG\r\n"
        off += len(reqs[2 * i])
    head, frames = await w.read_reply()
    assert head == b"OK 0 1\r\n" and frames == [reqs[0]]


async def test_stats_and_topics(server: LocalServer) -> None:
    w = await Wire.connect(server.host, server.port)
    await w.send(batch_request("st", [b"a"]))
    await w.reply()
    stats = await stat_map(w)
    for key in ("bytes.in", "bytes.out", "conns.active", "conns.total", "requests.batch", "errors.batch",
                "requests.total", "errors.total", "topics.disallowed", "topics.total", "topic.st.head"):
        assert key in stats, key
    assert stats["conns.active"] == "1"
    assert stats["requests.batch"] == "1"
    assert stats["topics.total"] == "2"  # default + st
    keys = list(stats)
    assert keys == sorted(keys)
    await w.send(b"TOPICS\r\n")
    body = await w.reply()
    assert b"st: 0 %d\r\n" % len(batch_request("st", [b"a"])) in body
    assert b"default: 0 0\r\n" in body


async def test_topic_limits(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", topics=3, topics_whitelist=("a", "b", "c",
                                                                                              "default")))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("zzz", [b"m"]))
    assert await w.reply() == b"ERR topic not allowed\r\n"
    await w.send(batch_request("a", [b"m"]) + batch_request("b", [b"m"]))
    assert await w.reply() == b"OK 0 1\r\n"
    assert await w.reply() == b"OK 0 1\r\n"
    await w.send(batch_request("c", [b"m"]))
    assert await w.reply() == b"ERR maximum topics allowed\r\n"
    stats = await stat_map(w)
    assert stats["topics.disallowed"] == "1"
    await w.send(b"READ c 0 1\r\n")
    assert await w.reply() == b"ERR not found\r\n"  # a rejected batch never creates a topic


async def test_max_connections(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", max_connections=2))
    a = await Wire.connect(srv.host, srv.port)
    b = await Wire.connect(srv.host, srv.port)
    await a.send(b"PING\r\n")
    await b.send(b"PING\r\n")
    assert await a.reply() == await b.reply() == b"PONG\r\n"
    c = await Wire.connect(srv.host, srv.port)
    assert await c.reply() == b"ERR too many connections\r\n"
    assert await c.closed()
    await a.aclose()
    with trio.fail_after(5):
        while True:  # the slot frees once the server sees the close
            d = await Wire.connect(srv.host, srv.port)
            await d.send(b"PING\r\n")
            if await d.reply() == b"PONG\r\n":
                break
            await trio.sleep(0.01)


async def test_restart_keeps_data_and_offsets(nursery: trio.Nursery, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "d", partition_size=300, partitions=3)
    reqs = [batch_request("r", [b"message %d" % i]) for i in range(20)]
    srv = await start_server(nursery, cfg)
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"".join(reqs[:10]))
    offs = [int((await w.reply()).split()[1]) for _ in range(10)]
    await w.aclose()
    with trio.fail_after(10):
        await srv.stop()
    srv2 = await start_server(nursery, cfg)
    w2 = await Wire.connect(srv2.host, srv2.port)
    await w2.send(b"".join(reqs[10:]))
    offs += [int((await w2.reply()).split()[1]) for _ in range(10)]
    expected = [sum(len(r) for r in reqs[:i]) for i in range(20)]
    assert offs == expected  # offsets continue across the restart
    await w2.send(b"TAIL r 50000\r\n")
    head, frames = await w2.read_reply()
    first = int(head.split()[1])
    assert first > 0  # retention removed the oldest partitions ...
    assert frames == reqs[expected.index(first):]  # ... and the rest is intact, in order
    await w2.send(b"READ r 0 1\r\n")
    assert await w2.reply() == b"ERR not found\r\n"
    srv2.scope.cancel()


async def test_graceful_shutdown_answers_inflight_and_stops(nursery: trio.Nursery, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "d")
    srv = await start_server(nursery, cfg)
    w = await Wire.connect(srv.host, srv.port)
    reqs = [batch_request("g", [b"%d" % i]) for i in range(50)]
    await w.send(b"".join(reqs))
    first = await w.reply()
    assert first == b"OK 0 1\r\n"
    srv.shutdown.set()
    answered = 1
    while True:
        try:
            line = await w.reply()
        except (EOFError, trio.BrokenResourceError):
            break
        assert line.startswith(b"OK ")
        answered += 1
    with trio.fail_after(cfg.shutdown_timeout + 5):
        await srv.stopped.wait()
    # every answered batch is durable and readable after a restart
    srv2 = await start_server(nursery, cfg)
    w2 = await Wire.connect(srv2.host, srv2.port)
    await w2.send(b"TAIL g 50000\r\n")
    _, frames = await w2.read_reply()
    assert frames[:answered] == reqs[:answered]
    srv2.scope.cancel()


async def test_idle_timeout_in_virtual_time(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", idle_timeout=30.0))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"PING\r\n")
    assert await w.reply() == b"PONG\r\n"
    t0 = trio.current_time()
    assert await w.closed()
    assert 30.0 <= trio.current_time() - t0 < 30.5


async def test_partial_request_times_out(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", timeout=5.0, idle_timeout=100.0))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"BATCH 100 t 0 1\r\nMSG")  # slowloris: never completes
    t0 = trio.current_time()
    assert await w.reply() == b"ERR timeout\r\n"
    assert await w.closed()
    assert 5.0 <= trio.current_time() - t0 < 5.5


async def test_long_poll_waits_then_not_found(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", max_wait=10.0, idle_timeout=0))
    w = await Wire.connect(srv.host, srv.port)
    req = batch_request("lp", [b"one"])
    await w.send(req)
    assert await w.reply() == b"OK 0 1\r\n"
    head = len(req)
    t0 = trio.current_time()
    await w.send(b"READ lp %d 5 2500\r\n" % head)
    assert await w.reply() == b"ERR not found\r\n"
    assert trio.current_time() - t0 == pytest.approx(2.5, abs=0.05)
    t0 = trio.current_time()
    await w.send(b"READ lp %d 5 600000\r\n" % head)  # capped by max_wait
    assert await w.reply() == b"ERR not found\r\n"
    assert trio.current_time() - t0 == pytest.approx(10.0, abs=0.05)


async def test_long_poll_wakes_on_new_batch(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    # The wait is far longer than any disk delay (creating the topic fsyncs in a worker thread,
    # while virtual time may jump): the poll must end with the batch, right after its OK.
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", max_wait=3600.0))
    reader = await Wire.connect(srv.host, srv.port)
    writer = await Wire.connect(srv.host, srv.port)
    req = batch_request("lw", [b"hello"])
    t0 = trio.current_time()
    acked_at: list[float] = []
    acked = trio.Event()

    async def write_later() -> None:
        await trio.sleep(3)
        await writer.send(req)
        assert await writer.reply() == b"OK 0 1\r\n"
        acked_at.append(trio.current_time())
        acked.set()

    nursery.start_soon(write_later)
    # The topic does not exist yet: the long-poll waits for its first batch.
    await reader.send(b"READ lw 0 10 3600000\r\n")
    head, frames = await reader.read_reply()
    assert head == b"OK 0 1\r\n" and frames == [req]  # woke with the batch, not at the end of its wait
    woke = trio.current_time()
    assert woke - t0 >= 3.0
    with trio.fail_after(1):
        await acked.wait()
    assert abs(woke - acked_at[0]) < 0.5  # no disk work between the OK and the wake


async def test_flush_batches_syncs_every_n_batches(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = capture_topics(monkeypatch)
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", flush_batches=5))
    w = await Wire.connect(srv.host, srv.port)
    for i in range(12):  # one at a time: each batch is its own append round
        await w.send(batch_request("fb", [b"%d" % i]))
        assert (await w.reply()).startswith(b"OK ")
    assert topics["fb"].log.fsync_count == 2  # after batch 5 and batch 10


class SyncStarts(syscalls.Layer):
    """Records the virtual time at which each fdatasync of a file under ``under`` starts."""

    def __init__(self, under: Path) -> None:
        super().__init__()
        self.under = str(under)
        self.started: list[float] = []

    def fdatasync(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(self.under):
            self.started.append(trio.from_thread.run_sync(trio.current_time))
        self.inner.fdatasync(fd)


async def test_interval_mode_syncs_when_idle(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vclock: trio.testing.MockClock,
    syscall_layer: Callable[[SyncStarts], SyncStarts],
) -> None:
    topics = capture_topics(monkeypatch)
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="interval", flush_interval=2.0))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("iv", [b"x"]))
    assert await w.reply() == b"OK 0 1\r\n"  # acknowledged before any fsync
    starts = syscall_layer(SyncStarts(tmp_path / "d" / "iv"))
    tlog = topics["iv"].log
    synced_at: list[float] = []
    tlog.on_fsync = lambda upto: synced_at.append(upto)
    assert tlog.fsync_count == 0
    t0 = trio.current_time()
    while not synced_at:  # noqa: ASYNC110 - on_fsync runs in a worker thread: poll (virtual time)
        await trio.sleep(0.1)
    # The fsync starts within one interval, with no further traffic (when it ends is the disk's business).
    assert starts.started and starts.started[0] - t0 <= 2.0
    assert synced_at[0] == len(batch_request("iv", [b"x"]))


# ---------------------------------------------------------------- regressions found in review


async def test_topic_that_cannot_be_opened_is_an_error_not_a_crash(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d"))
    (tmp_path / "d" / "blocked").write_bytes(b"a regular file where the topic directory would go")
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("blocked", [b"m"]))
    reply = await w.reply()
    assert reply.startswith(b"ERR storage error: cannot open topic blocked")
    other = await Wire.connect(srv.host, srv.port)  # the server is still up for everyone
    await other.send(b"PING\r\n")
    assert await other.reply() == b"PONG\r\n"


class FailingCalls(syscalls.Layer):
    """The next ``n`` calls of ``name`` (fdatasync or dup) fail with ``errno``; then real calls."""

    def __init__(self, name: str, n: int, err: int) -> None:
        super().__init__()
        self.name, self.left, self.err = name, n, err

    def _fail(self, name: str) -> None:
        if name == self.name and self.left:
            self.left -= 1
            raise OSError(self.err, f"{os.strerror(self.err)} (injected)")

    def fdatasync(self, fd: int) -> None:
        self._fail("fdatasync")
        self.inner.fdatasync(fd)

    def dup(self, fd: int) -> int:
        self._fail("dup")
        return self.inner.dup(fd)


async def test_failed_fsync_makes_the_topic_read_only_and_hides_the_batch(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[FailingCalls], FailingCalls]
) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d"))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("ff", [b"good"]))
    assert await w.reply() == b"OK 0 1\r\n"
    syscall_layer(FailingCalls("fdatasync", 1, errno.EIO))
    await w.send(batch_request("ff", [b"REJECTED"]))
    assert (await w.reply()).startswith(b"ERR storage error: fsync failed")
    await w.send(batch_request("ff", [b"later"]))
    assert b"read-only after an I/O error" in await w.reply()
    await w.send(b"READ ff 0 10\r\n")
    head, frames = await w.read_reply()
    assert head == b"OK 0 1\r\n" and frames == [batch_request("ff", [b"good"])]  # the failed batch is never served


async def test_graceful_shutdown_ends_long_polls_at_once(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", shutdown_timeout=60.0))
    follower = await Wire.connect(srv.host, srv.port)
    await follower.send(b"READ default 0 10 30000\r\n")
    await trio.sleep(1)
    t0 = trio.current_time()
    nursery.start_soon(srv.stop)
    assert await follower.reply() == b"ERR not found\r\n"
    assert trio.current_time() - t0 < 1.0  # not the 60 s grace, nor the 30 s wait
    await srv.stopped.wait()  # (then the topics' final fsync, which takes what the disk takes)


async def test_stats_and_topics_answer_in_request_order(server: LocalServer) -> None:
    w = await Wire.connect(server.host, server.port)
    req = batch_request("order", [b"x"])
    await w.send(req + b"TOPICS\r\n")
    assert await w.reply() == b"OK 0 1\r\n"
    assert b"order: 0 %d\r\n" % len(req) in await w.reply()  # TOPICS sees the batch acknowledged before it


async def test_timeout_bounds_progress_not_a_whole_slow_read(
    nursery: trio.Nursery, tmp_path: Path, vclock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", timeout=1.0, fsync="never"))
    w = await Wire.connect(srv.host, srv.port)
    reqs = [batch_request("slow", [b"z" * 60000]) for _ in range(40)]  # ~2.4 MB of frames
    for r in reqs:
        await w.send(r)
        assert (await w.reply()).startswith(b"OK ")
    await w.send(b"READ slow 0 50000\r\n")
    t0 = trio.current_time()
    got = 0
    total = len(b"OK 0 40\r\n") + sum(len(r) for r in reqs)
    while got < total:  # a steady reader slower than the whole reply's --timeout
        data = await w.stream.receive_some(65536)
        assert data, "the server closed a connection that kept reading"
        got += len(data)
        await trio.sleep(0.05)
    assert got == total
    assert trio.current_time() - t0 > 1.0


async def test_fsync_that_cannot_start_is_retried(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[FailingCalls], FailingCalls]
) -> None:
    """EMFILE while the topic duplicates fds for an fsync: nothing is lost, the fsync is retried."""
    srv = await start_server(nursery, make_config(tmp_path / "d"))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("em", [b"first"]))
    assert await w.reply() == b"OK 0 1\r\n"
    failing = syscall_layer(FailingCalls("dup", 2, errno.EMFILE))
    await w.send(batch_request("em", [b"second"]))
    with trio.fail_after(10):
        assert (await w.reply()).startswith(b"OK ")
    assert failing.left == 0


# ---------------------------------------------------------------- storage work stays off the Trio thread


class ThreadRecorder(syscalls.Layer):
    """Records, per call name, whether each call ran on the Trio (main) thread."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.calls: list[tuple[str, bool, str]] = []

    def _note(self, name: str, what: str) -> None:
        with self.lock:
            self.calls.append((name, threading.current_thread() is threading.main_thread(), what))

    def fsync(self, fd: int) -> None:
        self._note("fsync", os.readlink(f"/proc/self/fd/{fd}"))
        self.inner.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._note("fdatasync", os.readlink(f"/proc/self/fd/{fd}"))
        self.inner.fdatasync(fd)

    def unlink(self, path: Path) -> None:
        self._note("unlink", str(path))
        self.inner.unlink(path)


async def test_shutdown_syncs_off_the_trio_thread(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[ThreadRecorder], ThreadRecorder]
) -> None:
    """The final sync covers the head partition's index too, in a worker thread: closing the
    files at shutdown makes no fsync on the Trio thread (it used to sync the index there)."""
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never"))
    w = await Wire.connect(srv.host, srv.port)
    for i in range(5):
        await w.send(batch_request("sd", [b"m%d" % i]))
        assert (await w.reply()).startswith(b"OK ")
    rec = syscall_layer(ThreadRecorder())
    await srv.stop()
    synced = [(name, what) for name, main, what in rec.calls if not main]
    assert ("fdatasync", str(tmp_path / "d" / "sd" / "0.index")) in synced
    assert [c for c in rec.calls if c[1]] == []


async def test_retention_unlinks_off_the_trio_thread(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[ThreadRecorder], ThreadRecorder]
) -> None:
    rec = syscall_layer(ThreadRecorder())
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", partition_size=300, partitions=2))
    w = await Wire.connect(srv.host, srv.port)
    reqs = [batch_request("ru", [b"%03d" % i + b"x" * 80]) for i in range(20)]
    for r in reqs:
        await w.send(r)
        assert (await w.reply()).startswith(b"OK ")
    await w.send(b"TOPICS\r\n")
    first = int(re.search(rb"ru: (\d+) ", await w.reply()).group(1))  # type: ignore[union-attr]
    assert first > 0
    await srv.stop()
    names = sorted(p.name for p in (tmp_path / "d" / "ru").glob("*.log"))
    assert len(names) == 2 and f"{first}.log" in names
    unlinks = [(main, what) for name, main, what in rec.calls if name == "unlink"]
    assert len(unlinks) >= 2 * 3  # .log and .index of each dropped partition
    assert not any(main for main, _ in unlinks)


class GatedSync(syscalls.Layer):
    """Once armed, every fdatasync waits for ``release`` (real threads: the topic's fsync worker)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.release = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            self.release.wait(20)
        self.inner.fdatasync(fd)


async def test_retention_never_drops_unacknowledged_batches(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    syscall_layer: Callable[[GatedSync], GatedSync],
) -> None:
    """A burst larger than the retained size while an fsync is pending: the partitions holding
    not-yet-acknowledged batches stay (``first <= head`` in TOPICS), and every batch is readable
    when its OK arrives; retention catches up once they are acknowledged."""
    topics = capture_topics(monkeypatch)
    gate = syscall_layer(GatedSync())
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="always", partition_size=1000,
                                                  partitions=2))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("rb", [b"first"]))
    assert await w.reply() == b"OK 0 1\r\n"
    tl = topics["rb"].log
    reqs = [batch_request("rb", [b"%03d" % i + b"y" * 150]) for i in range(40)]  # ~7 KB, 2 KB retained
    gate.armed = True
    await w.send(b"".join(reqs))
    end = len(batch_request("rb", [b"first"])) + sum(map(len, reqs))
    with trio.fail_after(10):
        while tl.head < end:  # noqa: ASYNC110 - the topic appends while its fsync is held
            await trio.sleep(0.01)
    other = await Wire.connect(srv.host, srv.port)
    await other.send(b"TOPICS\r\n")
    m = re.search(rb"rb: (\d+) (\d+)\r\n", await other.reply())
    assert m is not None
    assert int(m.group(1)) <= int(m.group(2)), m.group(0)
    assert int(m.group(1)) == 0  # nothing past the first batch is acknowledged: nothing may go
    gate.release.set()
    reader = await Wire.connect(srv.host, srv.port)
    for req in reqs:
        line = await w.reply()
        assert line.startswith(b"OK "), line
        off = int(line.split()[1])
        if off >= tl.first:
            await reader.send(b"READ rb %d 1\r\n" % off)
            head, frames = await reader.read_reply()
            assert frames == [req], (off, head)
    await other.send(b"TOPICS\r\n")
    m = re.search(rb"rb: (\d+) (\d+)\r\n", await other.reply())
    assert m is not None and 0 < int(m.group(1)) <= int(m.group(2)) == end
    await srv.stop()


# ---------------------------------------------------------------- cancellation of the topic task


class CancelAtCapture(syscalls.Layer):
    """Records each completed fdatasync (path, size); once ``scope`` is set, the next ``dup``
    (a sync job being captured on the Trio thread) cancels it: the cancel lands between the
    capture of a job and the start of its worker thread."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.scope: trio.CancelScope | None = None
        self.synced: dict[str, int] = {}

    def dup(self, fd: int) -> int:
        if self.scope is not None:
            self.scope.cancel()
            self.scope = None
        return self.inner.dup(fd)

    def fdatasync(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        self.inner.fdatasync(fd)
        with self.lock:
            self.synced[os.readlink(f"/proc/self/fd/{fd}")] = size


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_cancel_between_capture_and_fsync_never_acknowledges_unsynced_batches(
    tmp_path: Path, syscall_layer: Callable[[CancelAtCapture], CancelAtCapture]
) -> None:
    """The topic task is cancelled (a second SIGTERM, an embedder cancelling serve()) right after
    its syncer captured a job: the job still runs, so a batch answered OK was fdatasynced, and
    the job's duplicated fds do not leak.  (The job used to be dropped unrun while its bytes
    counted as synced: the final sync then acknowledged a batch whose .log was never synced.)"""
    root = tmp_path / "d"
    root.mkdir()
    topic = Topic.open(root, "cc", make_config(root, fsync="always"))
    layer = syscall_layer(CancelAtCapture())
    fds = open_fds()
    frame = batch_request("cc", [b"payload"])
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            await n.start(topic.run)
            layer.scope = scope
            item = await topic.append(frame, 1)
            await item.done.wait()
    assert topic.closed
    assert item.error is not None or item.offset == 0
    if item.error is None:  # acknowledged: its bytes were made durable first
        assert layer.synced.get(str(root / "cc" / "0.log"), 0) >= len(frame), layer.synced
    assert open_fds() <= fds - 3  # the log, index and directory fds closed, and no dup left behind


async def test_cancelled_removal_still_removes_the_partitions(tmp_path: Path) -> None:
    """Cancelled just before its worker thread starts, a retention removal still runs: the
    dropped partitions are out of the log already, so they would otherwise never be removed
    (their files left behind, their fds leaked)."""
    root = tmp_path / "d"
    root.mkdir()
    topic = Topic.open(root, "cr", make_config(root, partition_size=300, partitions=2))
    for i in range(20):
        topic.log.append(batch_request("cr", [b"%03d" % i + b"x" * 80]), 1)
    topic.log.acknowledge(topic.log.head)
    assert topic.log.removal_pending
    with trio.CancelScope() as scope:
        scope.cancel()
        await topic._remove()
    assert not topic.log.removal_pending
    names = [p.name for p in (root / "cr").glob("*.log")]
    assert len(names) == 2 and f"{topic.log.first}.log" in names, names  # only the retained ones
    topic.log.close()


class PreadRecorder(syscalls.Layer):
    """Records, for each verification pread, whether it ran on the Trio (main) thread."""

    def __init__(self) -> None:
        super().__init__()
        self.on_main: list[bool] = []

    def pread(self, fd: int, n: int, pos: int) -> bytes:
        self.on_main.append(threading.current_thread() is threading.main_thread())
        return self.inner.pread(fd, n, pos)


async def test_read_verification_runs_off_the_trio_thread(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[PreadRecorder], PreadRecorder],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A READ of one small batch an earlier process wrote (not scrubbed yet) verifies it in a
    worker thread: the log's pread can block on a cold page cache (it used to run inline)."""
    root = tmp_path / "d"
    tl = TopicLog.open(root, "vr", partition_size=1 << 20, partitions=10)
    reqs = [batch_request("vr", [b"m%d" % i]) for i in range(5)]
    offs = [tl.append(r, 1) for r in reqs]
    tl.close()
    monkeypatch.setattr(recovery, "VERIFY_TAIL", 0)  # the restart re-verifies none of it itself
    rec = syscall_layer(PreadRecorder())
    srv = await start_server(nursery, make_config(root, scrub_rate=0))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"READ vr %d 1\r\n" % offs[2])
    _, frames = await w.read_reply()
    assert frames == [reqs[2]]
    assert rec.on_main and not any(rec.on_main)
    await srv.stop()
