"""Automatic failover with real etcd and real ``logd serve --etcd`` processes.

After each fault: every batch acknowledged (``--acks all --min-insync 2``) is on the new leader,
and the in-sync nodes' logs are byte-identical up to the leader's high watermark.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ...etcd_harness import EtcdCluster
from ...wire import Wire
from .nodes import Node, PinnedWriter, Reader, Writer, cluster_view, first_offset, log_bytes, wait_leader, write_some


async def test_three_nodes_elect_a_leader_that_takes_writes(nursery: trio.Nursery, tmp_path: Path,
                                                            etcd1: EtcdCluster) -> None:
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    leader = await wait_leader(nodes, in_sync=3)
    replies = await write_some(leader, "t", [b"m%d" % i for i in range(20)])
    assert all(r.startswith(b"OK ") for _, r in replies), replies
    others = [n for n in nodes if n is not leader]
    for n in others:
        got = await write_some(n, "t", [b"x"])
        assert got[0][1].startswith(b"ERR not leader"), got
    v = await cluster_view(others[0])
    assert v["role"] == "follower" and v["leader"]["node"] == leader.name
    hosts = ",".join(n.addr for n in nodes)
    out = await trio.run_process([sys.executable, "-m", "logd_trio_cli.main", "cluster", "--host", hosts, "--json"],
                                 capture_stdout=True)
    views = json.loads(out.stdout)
    assert {views[n.addr]["role"] for n in nodes} == {"leader", "follower"}
    assert views[leader.addr]["epoch"] >= 1 and views[leader.addr]["etcd"]["ok"] is True
    assert set(views[leader.addr]["in_sync"]) == {"a", "b", "c"}
    assert views[leader.addr]["topics"]["t"]["hw"] == views[leader.addr]["topics"]["t"]["head"]
    text = await trio.run_process([sys.executable, "-m", "logd_trio_cli.main", "cluster", "--host", leader.addr],
                                  capture_stdout=True)
    assert b"leader, epoch" in text.stdout and b"in sync: a, b, c" in text.stdout
    for n in nodes:
        await n.stop()


async def check_no_loss(nodes: list[Node], writers: list[Writer], topic: str) -> Node:
    """Every acknowledged tag is on the leader; in-sync logs identical up to its high watermark."""
    leader = await wait_leader(nodes)
    acked = [tag for w in writers for tag, _, _ in list(w.acked)]  # before the files are read: writers go on
    view = await cluster_view(leader)
    hw = view["topics"][topic]["hw"]
    data = log_bytes(leader.workdir, topic)
    missing = [tag for tag in acked if tag not in data]
    assert not missing, f"{len(missing)} acknowledged batches lost, e.g. {missing[:3]}"
    first = first_offset(leader.workdir, topic)
    for n in nodes:
        if n.name in view["in_sync"] and n is not leader:
            other = log_bytes(n.workdir, topic)
            assert first_offset(n.workdir, topic) == first
            assert other[: hw - first] == data[: hw - first], f"{n.name} differs from {leader.name} below {hw}"
    return leader


async def kill_leader_under_writers(nursery: trio.Nursery, nodes: list[Node], writers: list[Writer]) -> float:
    """kill -9 the leader while the writers write; the time to the first OK from another node."""
    leader = await wait_leader(nodes)
    before = sum(len(w.acked) for w in writers)
    with trio.fail_after(10):
        while sum(len(w.acked) for w in writers) < before + 20:  # noqa: ASYNC110
            await trio.sleep(0.02)
    killed_at = trio.current_time()
    leader.kill()
    await leader.wait_dead()
    with trio.move_on_after(15):
        while True:
            after = [t for w in writers for _, node, t in w.acked if node != leader.name and t > killed_at]
            if after:
                return min(after) - killed_at
            await trio.sleep(0.01)
    raise AssertionError("no OK from a new leader:\n" + "\n----\n".join(f"{n.name}: {n.log_tail(6000)}"
                                                                          for n in nodes))


async def test_leader_killed_under_writers_a_follower_takes_over_without_loss(
        nursery: trio.Nursery, tmp_path: Path, etcd1: EtcdCluster) -> None:
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    await wait_leader(nodes)
    writers = [Writer(nodes, "t", b"w%d" % i) for i in range(2)]
    reader = Reader(nodes, "t")
    for w in writers:
        nursery.start_soon(w.run)
    nursery.start_soon(reader.run)
    took = await kill_leader_under_writers(nursery, nodes, writers)
    assert took < 5.0, took
    dead = next(n for n in nodes if n.srv is not None and n.srv.proc.returncode is not None)
    await trio.sleep(0.3)  # the reader reads on the new leader too
    for w in writers:
        w.stop.set()
    reader.stop.set()
    await trio.sleep(0.2)
    new = await check_no_loss(nodes, writers, "t")
    assert new is not dead
    assert len(reader.seen) > 10
    reader.check(new.workdir)
    # the old leader comes back as a follower and catches up byte for byte
    await dead.start(nursery)
    with trio.fail_after(15):
        while True:
            v = await cluster_view(dead)
            if v["role"] == "follower" and dead.name in (await cluster_view(new))["in_sync"]:
                break
            await trio.sleep(0.05)
    hw = (await cluster_view(new))["topics"]["t"]["hw"]
    first = first_offset(new.workdir, "t")
    assert log_bytes(dead.workdir, "t")[: hw - first] == log_bytes(new.workdir, "t")[: hw - first]
    for n in nodes:
        await n.stop()


async def test_logd_write_with_several_hosts_resends_across_a_failover(
        nursery: trio.Nursery, tmp_path: Path, etcd1: EtcdCluster) -> None:
    """Every input line of ``logd write --host a,b,c`` is in the new leader's log (at least once)
    although the leader was killed while it wrote."""
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    leader = await wait_leader(nodes)
    hosts = ",".join(n.addr for n in nodes)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "logd_trio_cli.main", "write", "--host", hosts, "--topic", "t", "-q", "--timeout", "3s"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    lines = [b"line-%06d" % i for i in range(3000)]
    try:
        for i in range(0, len(lines), 100):
            if i == 1500:
                leader.kill()
            await proc.stdin.send_all(b"\n".join(lines[i:i + 100]) + b"\n")
            await trio.sleep(0.02)
        await proc.stdin.aclose()
        with trio.fail_after(40):
            err = b""
            async for chunk in proc.stderr:
                err += chunk
            assert await proc.wait() == 0, err.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
    new = await wait_leader(nodes)
    assert new is not leader
    data = log_bytes(new.workdir, "t")
    missing = [ln for ln in lines if b"\r\n" + ln + b"\r\n" not in data]
    assert not missing, f"{len(missing)} lines missing, e.g. {missing[:3]}"
    for n in nodes:
        if n is not leader:
            await n.stop()


async def test_paused_leader_wakes_up_deposed_and_acknowledges_nothing_it_lost(
        nursery: trio.Nursery, tmp_path: Path, etcd1: EtcdCluster) -> None:
    """SIGSTOP the leader under writers: another node leads; after SIGCONT every OK the old leader
    ever sent is on the new leader, it refuses writes, and it becomes a follower."""
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    old = await wait_leader(nodes)
    pinned = PinnedWriter(old, "t", b"p")
    writer = Writer([n for n in nodes if n is not old], "t", b"w")
    nursery.start_soon(pinned.run)
    with trio.fail_after(10):
        while len(pinned.acked) < 20:  # noqa: ASYNC110
            await trio.sleep(0.02)
    old.signal(signal.SIGSTOP)
    try:
        new = await wait_leader(nodes, skip=(old,))
        nursery.start_soon(writer.run)
        with trio.fail_after(10):
            while len(writer.acked) < 20:  # noqa: ASYNC110
                await trio.sleep(0.02)
    finally:
        old.signal(signal.SIGCONT)
    with trio.fail_after(15):
        while (await cluster_view(old))["role"] != "follower":  # noqa: ASYNC110
            await trio.sleep(0.05)
    got = await write_some(old, "t", [b"late"])
    assert got[0][1].startswith(b"ERR not leader"), got
    with trio.fail_after(5):  # the batch it held through the pause is refused too
        while not pinned.errors:  # noqa: ASYNC110
            await trio.sleep(0.02)
    # the batch it held across the pause too: deposed, it says so (not "not enough replicas" after a wait)
    assert all(e.startswith(b"ERR not leader") for e in pinned.errors), pinned.errors[:3]
    pinned.stop.set()
    writer.stop.set()
    with trio.fail_after(10):  # their last replies are in
        await pinned.finished.wait()
        await writer.finished.wait()
    data = log_bytes(new.workdir, "t")
    lost = [t for t in pinned.acked if t not in data]
    assert not lost, f"the paused leader acknowledged {len(lost)} batches the new leader lacks: {lost[:3]}"
    await check_no_loss(nodes, [writer], "t")
    with trio.fail_after(15):  # the old leader cut its unacknowledged tail and copies the new leader again
        while old.name not in (await cluster_view(new))["in_sync"]:  # noqa: ASYNC110
            await trio.sleep(0.05)
    hw = (await cluster_view(new))["topics"]["t"]["hw"]
    first = first_offset(new.workdir, "t")
    assert log_bytes(old.workdir, "t")[: hw - first] == log_bytes(new.workdir, "t")[: hw - first]
    for n in nodes:
        await n.stop()


async def read_all(node: Node, topic: str) -> list[bytes]:
    assert node.srv is not None
    w = await Wire.connect(node.srv.host, node.srv.port)
    try:
        await w.send(b"READ %s 0 1000\r\n" % topic.encode())
        head, frames = await w.read_reply()
    finally:
        await w.aclose()
    assert head.startswith(b"OK "), head
    return frames


async def test_etcd_down_longer_than_the_lease_stops_acknowledging_reads_go_on(
        nursery: trio.Nursery, tmp_path: Path, etcd1: EtcdCluster) -> None:
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    leader = await wait_leader(nodes, in_sync=3)
    acked = [t for t, r in await write_some(leader, "t", [b"before-%d;" % i for i in range(10)]) if r.startswith(b"OK")]
    assert len(acked) == 10
    member = etcd1.members[0]
    member.kill()
    down_at = trio.current_time()
    refused_at = None
    with trio.fail_after(10):
        while refused_at is None:
            (tag, reply), = await write_some(leader, "t", [b"during-%f;" % trio.current_time()])
            if reply.startswith(b"OK "):
                acked.append(tag)
            else:
                assert reply.startswith(b"ERR not leader"), reply
                refused_at = trio.current_time()
            await trio.sleep(0.05)
    assert refused_at - down_at < 1.0 + 1.0, refused_at - down_at  # the lease (1 s), and a keepalive's period
    for n in nodes:  # reads keep working everywhere
        frames = await read_all(n, "t")
        assert frames
    view = await cluster_view(leader)
    assert view["refusal"] is not None
    etcd1.restart(member)
    await trio.to_thread.run_sync(etcd1.wait_healthy)
    await wait_leader(nodes, within=20)
    await check_no_loss(nodes, [], "t")
    data = log_bytes((await wait_leader(nodes)).workdir, "t")
    assert all(t in data for t in acked)
    for n in nodes:
        await n.stop()


async def test_node_with_a_wiped_directory_does_not_lead_a_cluster_that_has_data(
        nursery: trio.Nursery, tmp_path: Path, etcd1: EtcdCluster) -> None:
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    leader = await wait_leader(nodes, in_sync=3)
    tags = [b"kept-%d;" % i for i in range(20)]
    assert all(r.startswith(b"OK ") for _, r in await write_some(leader, "t", tags))
    with trio.fail_after(10):  # every node caught up once: all may lead
        while not all([(await cluster_view(n))["eligible"] for n in nodes]):  # noqa: ASYNC110
            await trio.sleep(0.05)
    for n in nodes:
        n.kill()
    for n in nodes:
        await n.wait_dead()
    wiped = nodes[0]
    shutil.rmtree(wiped.workdir)
    await wiped.start(nursery)
    with trio.move_on_after(3.0):  # its lease-length wait and a campaign would long be over
        while (await cluster_view(wiped))["role"] != "leader":  # noqa: ASYNC110
            await trio.sleep(0.05)
    view = await cluster_view(wiped)
    assert view["role"] != "leader" and view["eligible"] is False, view
    got = await write_some(wiped, "t", [b"x"])
    assert got[0][1].startswith(b"ERR not leader"), got
    await nodes[1].start(nursery)
    new = await wait_leader(nodes, in_sync=1)
    assert new is nodes[1]
    with trio.fail_after(15):  # the wiped node copies the leader, then may lead again
        while not (await cluster_view(wiped))["eligible"]:  # noqa: ASYNC110
            await trio.sleep(0.05)
    data = log_bytes(wiped.workdir, "t")
    assert all(t in data for t in tags)
    for n in nodes[:2]:
        await n.stop()


@pytest.mark.slow
async def test_leader_killed_again_and_again_under_writers(nursery: trio.Nursery, tmp_path: Path,
                                                           etcd3: EtcdCluster) -> None:
    """Three etcd members; the leader killed three times under three writers, each time restarted
    (it comes back as a follower): after each, nothing acknowledged is missing, logs identical to HW."""
    nodes = [await Node(n, tmp_path / n, etcd3).start(nursery) for n in "abc"]
    await wait_leader(nodes, in_sync=3)
    writers = [Writer(nodes, "t", b"w%d" % i) for i in range(3)]
    reader = Reader(nodes, "t")
    for w in writers:
        nursery.start_soon(w.run)
    nursery.start_soon(reader.run)
    times = []
    for _ in range(3):
        await wait_leader(nodes, in_sync=3)
        times.append(await kill_leader_under_writers(nursery, nodes, writers))
        dead = next(n for n in nodes if n.srv is not None and n.srv.proc.returncode is not None)
        await check_no_loss(nodes, writers, "t")
        await dead.start(nursery)
    for w in writers:
        w.stop.set()
    await trio.sleep(0.3)
    reader.stop.set()
    await wait_leader(nodes, in_sync=3)
    final = await check_no_loss(nodes, writers, "t")
    reader.check(final.workdir)
    assert max(times) < 5.0, times
    for n in nodes:
        await n.stop()


async def test_follower_killed_under_writers_leaves_the_in_sync_set_and_rejoins(
        nursery: trio.Nursery, tmp_path: Path, etcd1: EtcdCluster) -> None:
    nodes = [await Node(n, tmp_path / n, etcd1).start(nursery) for n in "abc"]
    leader = await wait_leader(nodes, in_sync=3)
    writer = Writer(nodes, "t", b"w")
    nursery.start_soon(writer.run)
    follower = next(n for n in nodes if n is not leader)
    with trio.fail_after(10):
        while len(writer.acked) < 20:  # noqa: ASYNC110
            await trio.sleep(0.02)
    follower.kill()
    await follower.wait_dead()
    with trio.fail_after(10):  # dropped from the set once its session is gone; writes go on on two nodes
        while follower.name in (await cluster_view(leader))["in_sync"]:  # noqa: ASYNC110
            await trio.sleep(0.05)
        count = len(writer.acked)
        while len(writer.acked) < count + 20:  # noqa: ASYNC110
            await trio.sleep(0.02)
    assert all(node == leader.name for _, node, _ in writer.acked)
    await follower.start(nursery)
    with trio.fail_after(15):
        while follower.name not in (await cluster_view(leader))["in_sync"]:  # noqa: ASYNC110
            await trio.sleep(0.05)
    writer.stop.set()
    await trio.sleep(0.2)
    await check_no_loss(nodes, [writer], "t")
    for n in nodes:
        await n.stop()


async def test_etcd_leader_killed_the_cluster_keeps_its_leader_or_elects_one(
        nursery: trio.Nursery, tmp_path: Path, etcd3: EtcdCluster) -> None:
    nodes = [await Node(n, tmp_path / n, etcd3).start(nursery) for n in "abc"]
    await wait_leader(nodes, in_sync=3)
    writer = Writer(nodes, "t", b"w")
    nursery.start_soon(writer.run)
    with trio.fail_after(10):
        while len(writer.acked) < 20:  # noqa: ASYNC110
            await trio.sleep(0.02)
    etcd3.leader().kill()
    count = len(writer.acked)
    with trio.fail_after(15):  # writes go on (the same logd leader, or a new one)
        while len(writer.acked) < count + 50:  # noqa: ASYNC110
            await trio.sleep(0.02)
    writer.stop.set()
    await trio.sleep(0.2)
    await check_no_loss(nodes, [writer], "t")
    for n in nodes:
        await n.stop()


async def test_a_leader_stopped_with_sigterm_hands_over_at_once(nursery: trio.Nursery, tmp_path: Path,
                                                                 etcd1: EtcdCluster) -> None:
    """With 5 s leases, a leader that dies is replaced after about 5 s; one stopped gracefully
    resigns, so another node leads long before its lease would have run out."""
    nodes = [await Node(n, tmp_path / n, etcd1, lease="5s").start(nursery) for n in "abc"]
    leader = await wait_leader(nodes, in_sync=3)
    assert all(r.startswith(b"OK ") for _, r in await write_some(leader, "t", [b"x%d" % i for i in range(5)]))
    stopped_at = trio.current_time()
    await leader.stop()
    new = await wait_leader(nodes, skip=(leader,), within=20)
    assert trio.current_time() - stopped_at < 3.0, trio.current_time() - stopped_at
    assert b"resigned epoch" in leader.srv.log if leader.srv is not None else False
    for n in nodes:
        if n is not leader:
            await n.stop()
    assert new is not leader
