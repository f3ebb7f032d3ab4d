"""Real ``logd serve --etcd`` processes for the failover tests: start, ask CLUSTER, find the leader."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import trio

from ...etcd_harness import EtcdCluster
from ...harness import ServerProcess, spawn
from ...wire import Wire, batch_request

LEASE = "1s"
FAST = ("--acks", "all", "--min-insync", "2", "--replica-lag", "2s",
        "--partition-size", "16384", "--partitions", "100", "--timeout", "5s")


class Node:
    def __init__(self, name: str, workdir: Path, etcd: EtcdCluster, extra: tuple[str, ...] = (),
                 lease: str = LEASE) -> None:
        self.lease = lease
        self.name = name
        self.workdir = workdir
        self.etcd = etcd
        self.extra = extra
        self.srv: ServerProcess | None = None

    @property
    def addr(self) -> str:
        assert self.srv is not None
        return f"{self.srv.host}:{self.srv.port}"

    async def start(self, nursery: trio.Nursery) -> Node:
        self.srv = await spawn(nursery, self.workdir, "--node-id", self.name, "--etcd", ",".join(self.etcd.endpoints),
                               "--cluster", "c1", "--lease-ttl", self.lease, *FAST, *self.extra)
        return self

    def kill(self) -> None:
        assert self.srv is not None
        self.srv.proc.send_signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        assert self.srv is not None
        self.srv.proc.send_signal(sig)

    async def wait_dead(self) -> None:
        assert self.srv is not None
        with trio.fail_after(10):
            await self.srv.proc.wait()

    async def stop(self) -> None:
        if self.srv is not None and self.srv.proc.returncode is None:
            self.srv.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await self.srv.proc.wait()

    def log_tail(self, n: int = 3000) -> str:
        return bytes(self.srv.log[-n:]).decode(errors="replace") if self.srv is not None else ""


async def cluster_view(node: Node) -> dict[str, Any]:
    assert node.srv is not None
    with trio.fail_after(2.0):
        w = await Wire.connect(node.srv.host, node.srv.port)
        try:
            await w.send(b"CLUSTER\r\n")
            reply = await w.reply()
        finally:
            await w.aclose()
    assert reply.startswith(b"MOK "), reply
    body = json.loads(reply.split(b"\r\n", 1)[1])
    assert isinstance(body, dict)
    return body


async def wait_leader(nodes: list[Node], *, within: float = 15.0, in_sync: int = 2,
                      skip: tuple[Node, ...] = ()) -> Node:
    """The node that leads and may acknowledge, with at least ``in_sync`` nodes in its in-sync set."""
    with trio.move_on_after(within):
        while True:
            for n in nodes:
                if n.srv is None or n.srv.proc.returncode is not None or n in skip:
                    continue
                try:
                    v = await cluster_view(n)
                except (OSError, trio.TooSlowError, AssertionError, trio.BrokenResourceError, EOFError):
                    continue
                if v["role"] == "leader" and v["refusal"] is None and len(v["in_sync"]) >= in_sync:
                    return n
            await trio.sleep(0.05)
    raise AssertionError("no leader:\n" + "\n----\n".join(f"{n.name}: {n.log_tail()}" for n in nodes))


async def write_some(node: Node, topic: str, tags: list[bytes]) -> list[tuple[bytes, bytes]]:
    """One BATCH per tag on one connection; (tag, reply line) for each."""
    assert node.srv is not None
    w = await Wire.connect(node.srv.host, node.srv.port)
    try:
        await w.send(b"".join(batch_request(topic, [t]) for t in tags))
        return [(t, await w.reply()) for t in tags]
    finally:
        await w.aclose()


def log_bytes(workdir: Path, topic: str) -> bytes:
    """The topic's partitions concatenated in offset order (the bytes of the log)."""
    d = workdir / topic
    names = sorted((n for n in os.listdir(d) if n.endswith(".log")), key=lambda n: int(n.split(".")[0]))
    return b"".join((d / n).read_bytes() for n in names)


def first_offset(workdir: Path, topic: str) -> int:
    d = workdir / topic
    return min(int(n.split(".")[0]) for n in os.listdir(d) if n.endswith(".log"))


class Writer:
    """Writes tagged batches to whichever node leads (found with CLUSTER), one at a time, resending a
    batch that got no OK; records every OK: (tag, node, time)."""

    def __init__(self, nodes: list[Node], topic: str, prefix: bytes) -> None:
        self.nodes = nodes
        self.topic = topic
        self.prefix = prefix
        self.acked: list[tuple[bytes, str, float]] = []
        self.refused = 0
        self.stop = trio.Event()
        self.finished = trio.Event()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.finished.set()

    async def _run(self) -> None:
        leader: Node | None = None
        w: Wire | None = None
        i = 0
        while not self.stop.is_set():
            if leader is None or w is None:
                leader = await wait_leader(self.nodes, within=20)
                assert leader.srv is not None
                try:
                    w = await Wire.connect(leader.srv.host, leader.srv.port)
                except OSError:
                    leader = None
                    continue
            tag = b"%s-%06d;" % (self.prefix, i)
            try:
                with trio.fail_after(5):
                    await w.send(batch_request(self.topic, [tag]))
                    reply = await w.reply()
            except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError):
                reply = b""
            if reply.startswith(b"OK "):
                self.acked.append((tag, leader.name, trio.current_time()))
                i += 1
                continue
            self.refused += 1
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await w.aclose()
            leader, w = None, None
        if w is not None:
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await w.aclose()


class PinnedWriter:
    """Writes tagged batches to one node on one connection, whatever it says; records OKs and ERRs."""

    def __init__(self, node: Node, topic: str, prefix: bytes) -> None:
        self.node = node
        self.topic = topic
        self.prefix = prefix
        self.acked: list[bytes] = []
        self.errors: list[bytes] = []
        self.stop = trio.Event()
        self.finished = trio.Event()

    async def run(self) -> None:
        assert self.node.srv is not None
        w = await Wire.connect(self.node.srv.host, self.node.srv.port)
        i = 0
        try:
            while not self.stop.is_set():
                tag = b"%s-%06d;" % (self.prefix, i)
                i += 1
                await w.send(batch_request(self.topic, [tag]))
                reply = await w.reply()
                (self.acked if reply.startswith(b"OK ") else self.errors).append(tag if reply.startswith(b"OK ")
                                                                                  else reply)
                if not reply.startswith(b"OK "):
                    await trio.sleep(0.05)
        except (OSError, EOFError, trio.BrokenResourceError):
            pass
        finally:
            self.finished.set()
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await w.aclose()


class Reader:
    """Reads a topic from whichever node leads, from where it got to; records every frame it was
    shown with its offset (to check later that none of them vanished or changed)."""

    def __init__(self, nodes: list[Node], topic: str) -> None:
        self.nodes = nodes
        self.topic = topic
        self.seen: dict[int, bytes] = {}
        self.next = 0
        self.stop = trio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            leader = await wait_leader(self.nodes, within=20, in_sync=1)
            assert leader.srv is not None
            try:
                w = await Wire.connect(leader.srv.host, leader.srv.port)
            except OSError:
                continue
            try:
                while not self.stop.is_set():
                    with trio.fail_after(3):
                        await w.send(b"READ %s %d 1000 200\r\n" % (self.topic.encode(), self.next))
                        head, frames = await w.read_reply()
                    if not head.startswith(b"OK "):
                        await trio.sleep(0.02)
                        continue
                    at = int(head.split()[1])
                    for f in frames:
                        self.seen[at] = f
                        at += len(f)
                    self.next = at
            except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError):
                pass
            finally:
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    await w.aclose()

    def check(self, workdir: Path) -> None:
        """Every frame this reader saw is in the log at ``workdir`` at the same offset, byte for byte."""
        data, first = log_bytes(workdir, self.topic), first_offset(workdir, self.topic)
        wrong = [o for o, f in self.seen.items() if data[o - first:o - first + len(f)] != f]
        assert not wrong, f"{len(wrong)} frames a reader saw are not in the log any more, e.g. at {wrong[:3]}"
