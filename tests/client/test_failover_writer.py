"""FailoverWriter and find_leader against scripted nodes: a leader that is deposed mid-stream, a
connection lost without replies, a final refusal."""

from __future__ import annotations

import json

import anyio
import anyio.abc
import pytest

from logd_trio.client.failover import FailoverWriter, find_leader, parse_hosts, retriable
from logd_trio.core.addresses import AddressError
from logd_trio.core.errors import Timeout, WriteFailed

from .live import read_line, scripted_peer

pytestmark = pytest.mark.anyio


class FakeNode:
    """Answers CLUSTER with ``role`` and ``leader``; stores BATCH bodies; after ``ok_limit`` batches it
    answers ``refuse`` (or, with ``refuse`` None, closes the connection without replying)."""

    def __init__(self, role: str, ok_limit: int = 10**9, refuse: bytes | None = b"") -> None:
        self.role = role
        self.leader: str | None = None
        self.ok_limit = ok_limit
        self.refuse = refuse
        self.stored: list[bytes] = []
        self.requests = 0

    def view(self) -> bytes:
        leader = {"node": "x", "addr": self.leader, "epoch": 1} if self.leader else None
        return json.dumps({"role": self.role, "refusal": None if self.role == "leader" else "not leader",
                           "leader": leader}).encode()

    async def __call__(self, stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        offset = 0
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CLUSTER":
                body = self.view()
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(body), body))
                continue
            size = int(line.split()[1])
            start = len(line) + 2
            while len(buf) < size:
                buf += await stream.receive(65536)
            body, buf[:] = bytes(buf[:size]), buf[size:]
            self.requests += 1
            if len(self.stored) >= self.ok_limit:
                if self.refuse is None:
                    return  # gone without a reply
                await stream.send(b"ERR " + self.refuse + b"\r\n")
                continue
            self.stored.append(body)
            await stream.send(b"OK %d 1\r\n" % offset)
            offset += start + size


def messages_in(bodies: list[bytes]) -> list[bytes]:
    out = []
    for b in bodies:
        out += [m for m in b.split(b"\r\n") if m and not m.startswith(b"MSG ")]
    return out


async def test_a_deposed_leader_redirect_and_the_unacknowledged_batches_resent(tg: anyio.abc.TaskGroup) -> None:
    new = FakeNode("follower")
    new_addr = await scripted_peer(tg, new)
    old = FakeNode("leader", ok_limit=3, refuse=b"not leader " + new_addr.encode())
    old_addr = await scripted_peer(tg, old)
    new.role = "leader"
    async with FailoverWriter([old_addr, new_addr], "t", batch_size=200, window=4) as w:
        await w.write_many(b"m%03d" % i for i in range(40))
    sent = [b"m%03d" % i for i in range(40)]
    got = messages_in(old.stored) + messages_in(new.stored)
    assert sorted(set(got)) == sent  # every message at least once
    assert messages_in(new.stored) == [m for m in sent if m not in messages_in(old.stored)]  # in order
    assert len(old.stored) == 3 and w.failovers == 1 and w.acked_messages == 40
    assert w.leader == new_addr


async def test_a_lost_connection_resends_to_the_leader_cluster_names(tg: anyio.abc.TaskGroup) -> None:
    new = FakeNode("leader")
    new_addr = await scripted_peer(tg, new)
    old = FakeNode("leader", ok_limit=2, refuse=None)
    old_addr = await scripted_peer(tg, old)

    async with FailoverWriter([old_addr, new_addr], "t", batch_size=200, window=2) as w:
        await w.write_many(b"a%03d" % i for i in range(10))
        old.role, old.leader = "follower", new_addr  # the old node now names the new leader
        await w.write_many(b"b%03d" % i for i in range(30))
    sent = [b"a%03d" % i for i in range(10)] + [b"b%03d" % i for i in range(30)]
    assert set(messages_in(old.stored) + messages_in(new.stored)) == set(sent)
    assert w.acked_messages == 40 and w.failovers >= 1


async def test_a_final_refusal_says_how_many_messages_were_not_acknowledged(tg: anyio.abc.TaskGroup) -> None:
    node = FakeNode("leader", ok_limit=1, refuse=b"topic not allowed")
    addr = await scripted_peer(tg, node)
    with pytest.raises(WriteFailed, match=r"not acknowledged: ERR topic not allowed"):
        async with FailoverWriter([addr], "t", batch_size=200, window=1) as w:
            await w.write_many(b"m%03d" % i for i in range(20))
    assert len(node.stored) == 1


async def test_find_leader_prefers_the_node_that_leads(tg: anyio.abc.TaskGroup) -> None:
    leader = FakeNode("leader")
    follower = FakeNode("follower")
    leader_addr = await scripted_peer(tg, leader)
    follower.leader = leader_addr
    follower_addr = await scripted_peer(tg, follower)
    assert await find_leader([follower_addr, leader_addr]) == leader_addr
    assert await find_leader([follower_addr]) == leader_addr  # the leader it names
    assert await find_leader(["127.0.0.1:1"]) is None


def test_parse_hosts_and_retriable() -> None:
    assert parse_hosts("127.0.0.1:1774, 127.0.0.1:1775") == ["127.0.0.1:1774", "127.0.0.1:1775"]
    with pytest.raises(AddressError):
        parse_hosts("127.0.0.1:1774,nope:x")
    assert retriable("not leader 1.2.3.4:5") and retriable("not enough replicas") and retriable("fenced: epoch 3")
    assert not retriable("topic not allowed")


async def test_a_node_refusing_forever_is_given_up_on_with_backoff(tg: anyio.abc.TaskGroup) -> None:
    node = FakeNode("leader", ok_limit=1, refuse=b"not enough replicas")
    addr = await scripted_peer(tg, node)
    t0 = anyio.current_time()
    gave_up = r"within 1 s \(\d+ attempts, last: not enough replicas\); \d+ message\(s\) not acknowledged"
    with anyio.fail_after(10), pytest.raises(Timeout, match=gave_up):
        async with FailoverWriter([addr], "t", batch_size=200, window=1, give_up=1.0) as w:
            await w.write_many(b"m%03d" % i for i in range(20))
    elapsed = anyio.current_time() - t0
    assert 1.0 <= elapsed < 5.0, elapsed
    # backoff from 50 ms doubling (to 1 s): a handful of resends within the second, not a busy loop
    assert node.requests - 1 <= 12, node.requests
    assert 0 < w.acked_messages < 20 and w.pending_messages == 20 - w.acked_messages
