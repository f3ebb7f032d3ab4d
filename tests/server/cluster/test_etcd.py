"""The etcd client against a real etcd: kv, txn, leases, watch, failover, errors."""

from __future__ import annotations

import functools

import pytest
import trio

from logd_trio.server.cluster.etcd import EtcdClient, parse_endpoints
from logd_trio.server.cluster.etcd_wire import (
    Compare,
    Delete,
    EtcdBadReply,
    EtcdIndeterminate,
    EtcdUnavailable,
    Get,
    LeaseNotFound,
    Put,
    PutResult,
    RangeResult,
    WatchEvent,
)
from logd_trio.server.cluster.session import open_session

from ...etcd_harness import EtcdCluster, TcpProxy, free_ports


async def test_kv_round_trip(etcd: EtcdClient, prefix: str) -> None:
    key = prefix + "k\xff"
    assert await etcd.get(key) is None
    first = await etcd.put(key, b"v1\x00\xff")
    kv = await etcd.get(key)
    assert kv is not None and kv.key == key.encode() and kv.value == b"v1\x00\xff"
    assert kv.create_revision == kv.mod_revision == first.header.revision and kv.version == 1
    again = await etcd.put(key, "v2", prev_kv=True)
    assert again.prev is not None and again.prev.value == b"v1\x00\xff"
    kv2 = await etcd.get(key)
    assert kv2 is not None and kv2.value == b"v2" and kv2.version == 2 and kv2.create_revision == kv.create_revision

    await etcd.put(prefix + "a/1", "x")
    await etcd.put(prefix + "a/2", "y")
    await etcd.put(prefix + "a0", "not under a/")
    under = await etcd.get_prefix(prefix + "a/")
    assert [(kv.key, kv.value) for kv in under.kvs] == [((prefix + "a/1").encode(), b"x"),
                                                        ((prefix + "a/2").encode(), b"y")]
    assert under.count == 2
    gone = await etcd.delete(prefix + "a/", prefix=True, prev_kv=True)
    assert gone.deleted == 2 and sorted(kv.value for kv in gone.prev) == [b"x", b"y"]
    assert (await etcd.get_prefix(prefix + "a/")).kvs == ()
    assert await etcd.get(prefix + "a0") is not None


async def test_txn_compare_success_and_failure(etcd: EtcdClient, prefix: str) -> None:
    k = prefix + "lock"
    won = await etcd.txn([Compare.create_revision(k, 0)], [Put(k, "me")], [Get(k)])
    assert won.succeeded and isinstance(won.responses[0], PutResult)
    lost = await etcd.txn([Compare.create_revision(k, 0)], [Put(k, "other")], [Get(k)])
    assert not lost.succeeded
    got = lost.responses[0]
    assert isinstance(got, RangeResult) and got.kvs[0].value == b"me"

    kv = await etcd.get(k)
    assert kv is not None
    stale = await etcd.txn([Compare.mod_revision(k, kv.mod_revision - 1)], [Put(k, "stale")])
    assert not stale.succeeded and stale.responses == ()
    fresh = await etcd.txn([Compare.mod_revision(k, kv.mod_revision), Compare.value(k, "me")],
                           [Put(k, "next"), Delete(prefix + "nothing")])
    assert fresh.succeeded
    assert (await etcd.get(k)) is not None and (await etcd.get(k)).value == b"next"  # type: ignore[union-attr]
    assert not (await etcd.txn([Compare.value(k, "me")], [Delete(k)])).succeeded
    assert (await etcd.txn([Compare.value(k, "me", "!=")], [Delete(k)])).succeeded
    assert await etcd.get(k) is None
    with pytest.raises(ValueError, match="bad compare result"):
        Compare.value(k, "x", "~")


async def _wait_deleted(etcd: EtcdClient, key: str, start_revision: int) -> float:
    """Seconds until ``key`` is deleted (seen through a watch from ``start_revision``)."""
    t0 = trio.current_time()
    with trio.fail_after(5):
        async with etcd.watch(key, start_revision=start_revision) as w:
            async for ev in w:
                if ev.type == "DELETE":
                    return trio.current_time() - t0
    raise AssertionError("watch ended")


async def test_lease_expiry_deletes_its_keys(etcd: EtcdClient, prefix: str) -> None:
    lease = await etcd.lease_grant(1)
    assert lease.ttl == 1
    put = await etcd.put(prefix + "eph", "x", lease=lease.id)
    kv = await etcd.get(prefix + "eph")
    assert kv is not None and kv.lease == lease.id
    await _wait_deleted(etcd, prefix + "eph", put.header.revision + 1)
    assert await etcd.get(prefix + "eph") is None
    assert await etcd.lease_ttl(lease.id) is None
    with pytest.raises(LeaseNotFound):
        await etcd.lease_keepalive(lease.id)
    with pytest.raises(LeaseNotFound):
        await etcd.put(prefix + "eph", "again", lease=lease.id)
    await etcd.lease_revoke(lease.id)  # already gone: not an error


async def test_keepalive_keeps_keys_beyond_their_ttl(etcd: EtcdClient, prefix: str) -> None:
    async with open_session(etcd, 1) as session:
        await etcd.put(prefix + "kept", "x", lease=session.lease_id)
        # Two unrenewed leases granted one after the other: when the second is gone,
        # more than a TTL passed since the kept lease was granted.
        for name in ("b", "c"):
            lease = await etcd.lease_grant(1)
            put = await etcd.put(prefix + name, "x", lease=lease.id)
            await _wait_deleted(etcd, prefix + name, put.header.revision + 1)
        assert await etcd.get(prefix + "kept") is not None
        ttl = await etcd.lease_ttl(session.lease_id)
        assert ttl is not None and session.renewals >= 2 and session.valid()
    assert await etcd.get(prefix + "kept") is None  # closing the session revoked the lease


async def test_watch_sees_puts_and_deletes_and_replays_history(etcd: EtcdClient, prefix: str) -> None:
    async with etcd.watch(prefix, prefix=True, prev_kv=True) as w:
        p1 = await etcd.put(prefix + "x", "1")
        await etcd.put(prefix + "x", "2")
        d = await etcd.delete(prefix + "x")
        await etcd.put(prefix.rstrip("/") + "-outside", "no")
        with trio.fail_after(2):
            events = [await w.__anext__() for _ in range(3)]
    assert [(e.type, e.kv.value) for e in events] == [("PUT", b"1"), ("PUT", b"2"), ("DELETE", b"")]
    assert events[1].prev is not None and events[1].prev.value == b"1"
    assert events[2].prev is not None and events[2].prev.value == b"2"
    assert events[2].kv.mod_revision == d.header.revision
    async with etcd.watch(prefix + "x", start_revision=p1.header.revision) as old:
        with trio.fail_after(2):
            replay = [await old.__anext__() for _ in range(3)]
    assert replay == events_without_prev(events)


def events_without_prev(events: list[WatchEvent]) -> list[WatchEvent]:
    return [WatchEvent(e.type, e.kv, None) for e in events]


async def test_watch_replaced_when_idle_misses_nothing(etcd: EtcdClient, prefix: str) -> None:
    seen: list[bytes] = []
    four_seen = trio.Event()
    async with etcd.watch(prefix, prefix=True, idle_timeout=0.1) as w, trio.open_nursery() as nursery:

        async def consume() -> None:
            async for ev in w:
                seen.append(ev.kv.value)
                if len(seen) == 4:
                    four_seen.set()

        nursery.start_soon(consume)
        await etcd.put(prefix + "k", "1")
        with trio.fail_after(5):
            while w.reconnects < 2:  # noqa: ASYNC110 -- the quiet stream was replaced twice (a counter)
                await trio.sleep(0.01)
        for v in ("2", "3", "4"):  # each put as soon as a stream is being replaced
            before = w.reconnects
            with trio.fail_after(5):
                while w.reconnects == before:  # noqa: ASYNC110 -- a counter inside the watch
                    await trio.sleep(0.005)
            await etcd.put(prefix + "k", v)
        with trio.fail_after(2):
            await four_seen.wait()
        nursery.cancel_scope.cancel()
    assert seen == [b"1", b"2", b"3", b"4"] and w.reconnects >= 5


async def test_killed_etcd_ends_a_watch_with_a_typed_error_in_time(etcd1: EtcdCluster) -> None:
    async with EtcdClient(etcd1.endpoints, timeout=1) as etcd:
        async with etcd.watch("w", idle_timeout=30) as w:
            await etcd.put("w", "1")
            with trio.fail_after(2):
                assert (await w.__anext__()).kv.value == b"1"
            etcd1.members[0].kill()
            t0 = trio.current_time()
            with trio.fail_after(3), pytest.raises(EtcdUnavailable, match="no endpoint served a watch"):
                await w.__anext__()
            assert trio.current_time() - t0 < 1.5  # the reconnect budget, not the 30 s idle timeout
        with trio.fail_after(2), pytest.raises(EtcdUnavailable, match=r"no endpoint answered within 1s"):
            await etcd.get("w")


async def test_paused_etcd_never_hangs_a_watch_or_a_call(etcd1: EtcdCluster) -> None:
    async with EtcdClient(etcd1.endpoints, timeout=0.5) as etcd:
        async with etcd.watch("w", idle_timeout=0.3) as w:
            etcd1.members[0].pause()
            t0 = trio.current_time()
            with trio.fail_after(3), pytest.raises(EtcdUnavailable):
                await w.__anext__()
            assert trio.current_time() - t0 < 0.3 + 0.5 + 0.5
        t0 = trio.current_time()
        with trio.fail_after(3), pytest.raises(EtcdUnavailable):
            await etcd.get("w")
        with trio.fail_after(3), pytest.raises(EtcdIndeterminate):
            await etcd.put("w", "2")  # sent: it may be applied once etcd wakes up
        assert trio.current_time() - t0 < 1.5
        etcd1.members[0].resume()
        with trio.fail_after(3):
            await etcd.get("w")


async def test_failover_between_endpoints_when_a_member_dies(etcd3: EtcdCluster) -> None:
    leader = etcd3.leader()
    first, second = (m for m in etcd3.members if m is not leader)
    async with EtcdClient([first.url, second.url, leader.url], timeout=3) as etcd:
        await etcd.put("k", "0")
        assert etcd.endpoint == first.url
        seen: list[bytes] = []
        async with etcd.watch("k", idle_timeout=1) as w:
            first.kill()
            for i in range(1, 6):
                await etcd.put("k", str(i))
            with trio.fail_after(5):
                while len(seen) < 5:
                    seen.append((await w.__anext__()).kv.value)
        assert seen == [b"1", b"2", b"3", b"4", b"5"]  # nothing lost by the move to another member
        assert etcd.endpoint != first.url
        kv = await etcd.get("k")
        assert kv is not None and kv.value == b"5"
        # One member left: no quorum, and the client says so within its timeout.
        second.kill()
        t0 = trio.current_time()
        with trio.fail_after(5), pytest.raises(EtcdUnavailable):
            await etcd.get("k")
        assert trio.current_time() - t0 < 3.5


async def test_etcd_raft_leader_death(etcd3: EtcdCluster) -> None:
    leader = etcd3.leader()
    async with EtcdClient([leader.url] + [m.url for m in etcd3.members if m is not leader], timeout=2) as etcd:
        await etcd.put("k", "0")
        async with etcd.watch("k", idle_timeout=1) as w:
            leader.kill()
            t0 = trio.current_time()
            indeterminate = 0
            with trio.fail_after(10):
                while True:  # a write in flight when the raft leader dies may stall: its outcome is unknown
                    try:
                        await etcd.put("k", "1")
                        break
                    except EtcdIndeterminate:
                        indeterminate += 1
            took = trio.current_time() - t0
            with trio.fail_after(5):
                assert (await w.__anext__()).kv.value == b"1"
        kv = await etcd.get("k")
        assert kv is not None and kv.value == b"1" and took < 8, (took, indeterminate)


async def test_a_write_whose_reply_is_lost_is_indeterminate(nursery: trio.Nursery, etcd: EtcdClient,
                                                            shared_etcd: EtcdCluster, prefix: str) -> None:
    proxy = TcpProxy(shared_etcd.members[0].client_port)
    await proxy.start(nursery)
    async with EtcdClient([proxy.url], timeout=0.5) as via, etcd.watch(prefix + "k") as w:
        await via.put(prefix + "k", "before")
        proxy.freeze()
        with pytest.raises(EtcdIndeterminate, match="may have been applied"):
            await via.put(prefix + "k", "during")
        with pytest.raises(EtcdUnavailable) as read:
            await via.get(prefix + "k")
        assert not isinstance(read.value, EtcdIndeterminate)
        proxy.thaw()  # the held request reaches etcd after all
        with trio.fail_after(3):
            assert [(await w.__anext__()).kv.value for _ in range(2)] == [b"before", b"during"]


async def test_unreachable_and_wrong_endpoints(nursery: trio.Nursery) -> None:
    (port,) = free_ports(1)
    async with EtcdClient([f"127.0.0.1:{port}"], timeout=0.3) as etcd:
        t0 = trio.current_time()
        with pytest.raises(EtcdUnavailable, match=r"no endpoint answered within 0\.3s"):
            await etcd.get("k")
        assert trio.current_time() - t0 < 1

    async def not_etcd(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nNot Found")
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, not_etcd, 0, host="127.0.0.1"))
    other = listeners[0].socket.getsockname()[1]
    async with EtcdClient([f"http://127.0.0.1:{other}"], timeout=1) as etcd:
        with pytest.raises(EtcdBadReply, match="not an etcd v3 gateway reply"):
            await etcd.get("k")

    async def endless(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        try:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
            for _ in range(100_000):
                await stream.send_all(b"[" * 1000)
        except trio.BrokenResourceError:
            pass  # the client hung up: what the test wants

    listeners = await nursery.start(functools.partial(trio.serve_tcp, endless, 0, host="127.0.0.1"))
    huge = listeners[0].socket.getsockname()[1]
    async with EtcdClient([f"http://127.0.0.1:{huge}"], timeout=5) as etcd:
        with pytest.raises(EtcdBadReply, match="reply over 4194304 bytes"):
            await etcd.get("k")


def test_endpoint_parsing() -> None:
    assert parse_endpoints("http://a:2379, b:2380,") == ["http://a:2379", "http://b:2380"]
    assert parse_endpoints(["https://h:1"]) == ["https://h:1"]
    for bad in ("", "http://a", "ftp://a:1", "http://a:1/v3", "a:x"):
        with pytest.raises(ValueError, match="etcd endpoint"):
            parse_endpoints(bad)


async def test_malformed_gateway_replies_are_clear_errors(nursery: trio.Nursery) -> None:
    replies = [b'{"ID": "abc", "TTL": "2"}', b'{"result": {"ID": "1", "TTL": [2]}}', b'{"kvs": "no"}']

    async def scripted(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        body = replies.pop(0)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                              % (len(body), body))
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, scripted, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with EtcdClient([f"127.0.0.1:{port}"], timeout=1) as etcd:
        with pytest.raises(EtcdBadReply, match="expected an integer, got 'abc'"):
            await etcd.lease_grant(2)
        with pytest.raises(EtcdBadReply, match=r"expected an integer, got \[2\]"):
            await etcd.lease_keepalive(1)
        with pytest.raises(EtcdBadReply, match="kvs: expected a list"):
            await etcd.get("k")
