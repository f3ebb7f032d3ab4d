"""``DELETE <topic>``: a real server, real files, raw-protocol clients."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from logd_trio.core import requests as p
from logd_trio.core.errors import RequestError
from logd_trio.server.storage import syscalls
from logd_trio.server.storage.files import DELETED_PREFIX
from logd_trio.server.topic import INBOX_SIZE

from ..harness import make_config, start_server
from ..wire import Wire, batch_request


def test_parser_reads_delete() -> None:
    parser = p.RequestParser()
    parser.receive_data(b"DELETE t.1\r\nDELETE\r\nDELETE a b\r\nDELETE ../x\r\n")
    assert parser.next_event() == p.Delete("t.1")
    for reason in ("request missing topic", "invalid request", "invalid topic"):
        with pytest.raises(RequestError, match=reason):
            parser.next_event()
    assert p.encode_delete("t.1") == b"DELETE t.1\r\n"


async def _fill(w: Wire, topic: str, n: int, size: int = 200) -> list[int]:
    await w.send(b"".join(batch_request(topic, [b"x" * size]) for _ in range(n)))
    offsets = []
    for _ in range(n):
        reply = await w.line()
        assert reply.startswith(b"OK "), reply
        offsets.append(int(reply.split()[1]))
    return offsets


async def test_delete_removes_the_topic_and_its_files(nursery: trio.Nursery, tmp_path: Path) -> None:
    root = tmp_path / "d"
    srv = await start_server(nursery, make_config(root, partition_size=1000, partitions=100))
    w = await Wire.connect(srv.host, srv.port)
    await _fill(w, "t", 20)  # several partitions
    await _fill(w, "keep", 1)
    assert len(list((root / "t").glob("*.log"))) > 2
    await w.send(b"DELETE t\r\n")
    assert await w.line() == b"OK\r\n"
    assert not (root / "t").exists() and not [n for n in os.listdir(root) if n.startswith(DELETED_PREFIX)]
    await w.send(b"TOPICS\r\nREAD t 0 10\r\nDELETE t\r\n")
    topics = await w.reply()
    assert b"keep: " in topics and b"\r\nt: " not in topics and not topics.startswith(b"MOK 0")
    assert await w.line() == b"ERR not found\r\n"
    assert await w.line() == b"ERR not found\r\n"  # deleting again: no such topic
    # a new BATCH creates the topic anew, from offset 0
    assert await _fill(w, "t", 1) == [0]
    await w.send(b"STATS\r\n")
    stats = await w.reply()
    assert b"requests.delete: 2\r\n" in stats and b"errors.delete: 1\r\n" in stats
    await srv.stop()
    # the deletion is durable: a restart serves only what was written after it
    srv = await start_server(nursery, make_config(root))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"READ t 0 100\r\n")
    head, frames = await w.read_reply()
    assert head.startswith(b"OK 0 1") and len(frames) == 1
    await srv.stop()


async def test_a_long_poll_on_a_deleted_topic_ends_with_an_error(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="always"))
    w = await Wire.connect(srv.host, srv.port)
    (offset,) = await _fill(w, "t", 1)
    head = offset + len(batch_request("t", [b"x" * 200]))
    follower = await Wire.connect(srv.host, srv.port)
    await follower.send(b"READ t %d 10 20000\r\n" % head)  # waits at the head
    with trio.fail_after(5):
        while await _waiting(w) == 0:  # one STATS round trip each
            pass
        await w.send(b"DELETE t\r\n")
        assert await w.line() == b"OK\r\n"
        assert await follower.line() == b"ERR topic deleted\r\n"
    await follower.send(b"PING\r\n")  # the follower's connection is still usable
    assert await follower.line() == b"PONG\r\n"
    await srv.stop()


async def _waiting(w: Wire) -> int:
    """Long-polls waiting on the server now (STATS)."""
    await w.send(b"STATS\r\n")
    stats = await w.reply()
    return int(stats.split(b"longpoll.waiting: ")[1].split(b"\r\n")[0])


async def test_batches_pipelined_before_delete_are_answered_first(nursery: trio.Nursery, tmp_path: Path) -> None:
    root = tmp_path / "d"
    srv = await start_server(nursery, make_config(root, fsync="always"))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("t", [b"a"]) * 5 + b"DELETE t\r\n" + batch_request("t", [b"b"]))
    replies = [await w.line() for _ in range(7)]
    assert all(r.startswith(b"OK ") and r.endswith(b" 1\r\n") for r in replies[:5]), replies
    assert replies[5] == b"OK\r\n"
    assert replies[6] == b"OK 0 1\r\n"  # the batch after DELETE starts the topic anew
    await srv.stop()


async def test_a_deletion_a_crash_interrupted_is_finished_at_start(nursery: trio.Nursery, tmp_path: Path) -> None:
    root = tmp_path / "d"
    aside = root / f"{DELETED_PREFIX}t~123"
    aside.mkdir(parents=True)
    (aside / "0.log").write_bytes(batch_request("t", [b"old"]))
    (aside / "0.index").write_bytes(b"")
    srv = await start_server(nursery, make_config(root))
    assert not aside.exists()
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"TOPICS\r\n")
    assert b"t: " not in (await w.reply()).replace(b"default: ", b"")
    await srv.stop()


async def test_a_follower_refuses_delete(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="always", node_id="f1",
                                                  replicate_from="127.0.0.1:9"))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"DELETE default\r\n")
    assert await w.line() == b"ERR not leader 127.0.0.1:9\r\n"
    assert (tmp_path / "d" / "default").is_dir()
    srv.scope.cancel()


async def test_a_failed_removal_serves_the_topic_again(nursery: trio.Nursery, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "d"
    srv = await start_server(nursery, make_config(root))
    w = await Wire.connect(srv.host, srv.port)
    await _fill(w, "t", 3)
    rename = os.rename

    def refuse(src: object, dst: object) -> None:  # a fault at the OS call (running as root ignores modes)
        if DELETED_PREFIX in str(dst):
            raise PermissionError(13, "Permission denied", str(src))
        rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", refuse)
    await w.send(b"DELETE t\r\n")
    reply = await w.line()
    assert reply == b"ERR storage error: cannot delete topic t: Permission denied\r\n", reply
    await w.send(b"READ t 0 10\r\n")
    head, frames = await w.read_reply()
    assert head.startswith(b"OK 0 3") and len(frames) == 3
    await srv.stop()


class GatedSync(syscalls.Layer):
    """Once armed, every fsync and fdatasync waits for ``release`` (they run in worker threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def _gate(self) -> None:
        if self.armed:
            self.entered.set()
            self.release.wait(20)

    def fsync(self, fd: int) -> None:
        self._gate()
        self.inner.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._gate()
        self.inner.fdatasync(fd)


async def test_a_writer_waiting_on_a_full_inbox_during_delete_keeps_its_connection(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[GatedSync], GatedSync]
) -> None:
    """A BATCH that waits for room in the topic's inbox when DELETE closes it goes to the topic
    created anew: every batch is answered OK, none is lost, the connection stays open."""
    gate = syscall_layer(GatedSync())
    # --flush-batches 1: the topic task itself waits for an fsync after each round of appends
    srv = await start_server(nursery, make_config(tmp_path / "d", fsync="never", flush_batches=1))
    admin = await Wire.connect(srv.host, srv.port)
    await _fill(admin, "t", 1)
    with trio.fail_after(10):
        while (await _stats(admin)).get("topic.t.fsyncs", 0) < 1:  # its fsync (after its OK) is done
            pass
    gate.armed = True
    held = await Wire.connect(srv.host, srv.port)
    await held.send(batch_request("t", [b"held"]))  # the topic task now waits in its fsync
    writers = [await Wire.connect(srv.host, srv.port) for _ in range(INBOX_SIZE + 1)]
    with trio.fail_after(10):
        assert await trio.to_thread.run_sync(gate.entered.wait, 10)
        for i, w in enumerate(writers):  # one batch each, in order: INBOX_SIZE fill the inbox,
            await w.send(batch_request("t", [b"%04d" % i]))  # the last one waits for room
            while (await _stats(admin))["requests.batch"] < 3 + i:
                pass
        await admin.send(b"DELETE t\r\n")
        watcher = await Wire.connect(srv.host, srv.port)
        while b"\r\nt: " in await _ask(watcher, b"TOPICS\r\n"):  # DELETE has closed the inbox
            pass
        gate.armed = False
        gate.release.set()
        assert await admin.line() == b"OK\r\n"
        assert (await held.line()).startswith(b"OK ")
        replies = [await w.line() for w in writers]
    assert all(r.startswith(b"OK ") for r in replies[:-1]), replies
    assert replies[-1] == b"OK 0 1\r\n"  # what waited for room went to the topic created anew
    last = writers[-1]
    await last.send(b"READ t 0 10000\r\nPING\r\n")
    _, frames = await last.read_reply()
    assert frames == [batch_request("t", [b"%04d" % INBOX_SIZE])]
    assert await last.line() == b"PONG\r\n"
    await srv.stop()


async def _stats(w: Wire) -> dict[str, int]:
    await w.send(b"STATS\r\n")
    body = (await w.reply()).split(b"\r\n", 1)[1]
    return {k: int(v) for k, v in (line.decode().split(": ", 1) for line in body.split(b"\r\n") if b": " in line)
            if v.isdigit()}


async def _ask(w: Wire, request: bytes) -> bytes:
    await w.send(request)
    return await w.reply()
