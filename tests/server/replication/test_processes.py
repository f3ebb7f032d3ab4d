"""Leader and followers as real ``logd serve`` processes on port 0."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio

from logd_trio.core.fetch import encode_fetch

from ...harness import ServerProcess, spawn
from ...wire import Wire, batch_request

SMALL = ("--partition-size", "4096", "--partitions", "3")


def log_files(workdir: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for topic in sorted(os.listdir(workdir)):
        d = workdir / topic
        if d.is_dir():
            for n in os.listdir(d):
                if n.endswith(".log"):
                    out[f"{topic}/{n}"] = (d / n).read_bytes()
    return out


async def heads(srv: ServerProcess) -> dict[str, tuple[int, int]]:
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"TOPICS\r\n")
    reply = await w.reply()
    body = reply.split(b"\r\n", 1)[1]
    out: dict[str, tuple[int, int]] = {}
    for line in body.split(b"\r\n"):
        if b":" in line:
            name, _, rest = line.partition(b": ")
            first, head = rest.split()
            out[name.decode()] = (int(first), int(head))
    return out


async def converge(leader: ServerProcess, *followers: ServerProcess) -> dict[str, tuple[int, int]]:
    with trio.move_on_after(30):
        while True:
            want = await heads(leader)
            got = [await heads(f) for f in followers]
            if all({t: h for t, (_, h) in g.items()} == {t: h for t, (_, h) in want.items()} for g in got):
                return want
            await trio.sleep(0.05)
    logs = b"\n----\n".join(bytes(f.log[-3000:]) for f in (leader, *followers)).decode(errors="replace")
    raise AssertionError(f"no convergence: {want} vs {got}\n{logs}")


async def write(srv: ServerProcess, topic: str, n: int, tag: bytes = b"") -> None:
    w = await Wire.connect(srv.host, srv.port)
    reqs = [batch_request(topic, [b"%s-%d-%s" % (tag, i, b"y" * (i % 50)) for _ in range(1 + i % 4)])
            for i in range(n)]
    await w.send(b"".join(reqs))
    for _ in reqs:
        reply = await w.reply()
        assert reply.startswith(b"OK "), reply


async def stop(*procs: ServerProcess) -> None:
    for p in procs:
        p.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        for p in procs:
            assert await p.proc.wait() == 0, bytes(p.log[-2000:]).decode(errors="replace")


async def test_followers_copy_the_leader_byte_for_byte(nursery: trio.Nursery, tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", *SMALL)
    addr = f"{leader.host}:{leader.port}"
    b = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", addr, *SMALL)
    c = await spawn(nursery, tmp_path / "c", "--node-id", "c", "--replicate-from", addr, *SMALL)
    async with trio.open_nursery() as load:
        for topic in ("t1", "t2", "default"):
            load.start_soon(write, leader, topic, 400, topic.encode())
    await write(leader, "t3", 50)  # a topic that appears while the followers run
    want = await converge(leader, b, c)
    assert want["t1"][0] > 0  # retention removed the oldest partitions
    await stop(b, c, leader)
    a_files = log_files(tmp_path / "a")
    assert len([n for n in a_files if n.startswith("t1/")]) >= 2
    assert log_files(tmp_path / "b") == a_files
    assert log_files(tmp_path / "c") == a_files


async def test_a_follower_refuses_writes_and_the_leader_checks_fetches(nursery: trio.Nursery,
                                                                        tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")
    addr = f"{leader.host}:{leader.port}"
    f = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", addr)
    w = await Wire.connect(f.host, f.port)
    await w.send(batch_request("t", [b"x"]))
    assert await w.reply() == b"ERR not leader %s\r\n" % addr.encode()
    await write(leader, "t", 3)
    lw = await Wire.connect(leader.host, leader.port)
    await lw.send(encode_fetch("z", 0, "nope", 0, 1000, 0))
    assert await lw.reply() == b"ERR unknown topic nope\r\n"
    await lw.send(encode_fetch("z", 99, "t", 0, 1000, 0))
    assert (await lw.reply()).startswith(b"ERR fenced: epoch 99")
    await lw.send(encode_fetch("z", 0, "t", 1, 1000, 0))
    assert b"inside a batch" in await lw.reply()
    await lw.send(encode_fetch("a", 0, "t", 0, 1000, 0))
    assert b"own id" in await lw.reply()
    await lw.send(encode_fetch("z", 0, "t", 0, 1000, 0))
    line = await lw.line()
    assert line.startswith(b"FETCHED 1 1 0 ")
    await stop(f, leader)


async def test_a_follower_of_a_follower_refuses_to_run(nursery: trio.Nursery, tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")
    f = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"{leader.host}:{leader.port}")
    g = await spawn(nursery, tmp_path / "c", "--node-id", "c", "--replicate-from", f"{f.host}:{f.port}")
    with trio.fail_after(20):
        assert await g.proc.wait() == 1
    assert b"not leader" in g.log
    await stop(f, leader)


def frames_of(workdir: Path, topic: str) -> list[bytes]:
    """Every stored frame of a topic, in offset order (no torn or duplicated frame may hide in the files)."""
    from logd_trio.core.framing import check_frame

    d = workdir / topic
    out: list[bytes] = []
    for n in sorted((n for n in os.listdir(d) if n.endswith(".log")), key=lambda n: int(n.split(".")[0])):
        data = (d / n).read_bytes()
        at = 0
        while at < len(data):
            h = check_frame(data, at)
            assert h is not None, f"{n}: bad frame at {at}"
            out.append(data[at:at + h.frame_len])
            at += h.frame_len
    return out


async def test_a_follower_killed_under_load_catches_up(nursery: trio.Nursery, tmp_path: Path) -> None:
    big = ("--partition-size", "65536", "--partitions", "100")
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", *big)
    addr = f"{leader.host}:{leader.port}"
    args = ("--node-id", "b", "--replicate-from", addr, *big)
    b = await spawn(nursery, tmp_path / "b", *args)
    async with trio.open_nursery() as load:
        load.start_soon(write, leader, "t", 3000, b"k")
        with trio.fail_after(20):  # kill the follower once it has copied part of the load
            while (await heads(b)).get("t", (0, 0))[1] < 20_000:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.01)
        b.proc.kill()
        await b.proc.wait()
    b2 = await spawn(nursery, tmp_path / "b", *args)
    await write(leader, "t", 200, b"after")
    await converge(leader, b2)
    await stop(b2, leader)
    assert log_files(tmp_path / "b") == log_files(tmp_path / "a")
    frames = frames_of(tmp_path / "b", "t")
    assert len(frames) == 3200 and len(set(frames)) == 3200


async def test_a_follower_joining_after_retention_starts_at_the_leaders_first(nursery: trio.Nursery,
                                                                              tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", *SMALL)
    await write(leader, "t", 500)
    first = (await heads(leader))["t"][0]
    assert first > 0
    f = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"{leader.host}:{leader.port}",
                    *SMALL)
    await converge(leader, f)
    assert (await heads(f))["t"][0] == first
    r = await Wire.connect(f.host, f.port)  # the follower serves reads from the leader's first offset
    await r.send(b"READ t %d 1\r\n" % first)
    header, batches = await r.read_reply()
    assert header == b"OK %d 1\r\n" % first and len(batches) == 1
    await stop(f, leader)
    assert log_files(tmp_path / "b") == log_files(tmp_path / "a")
    assert f"t/{first}.log" in log_files(tmp_path / "b")


async def test_acks_all_waits_for_followers_and_refuses_without_them(nursery: trio.Nursery,
                                                                     tmp_path: Path) -> None:
    acks = ("--acks", "all", "--min-insync", "2", "--replica-lag", "1s")
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", *acks)
    addr = f"{leader.host}:{leader.port}"
    w = await Wire.connect(leader.host, leader.port)
    await w.send(batch_request("t", [b"lonely"]))
    assert await w.reply() == b"ERR not enough replicas\r\n"  # at once: no follower in sync
    args = ("--node-id", "b", "--replicate-from", addr)
    b = await spawn(nursery, tmp_path / "b", *args)
    with trio.fail_after(20):
        while True:  # the follower joins the in-sync set with its first fetch
            await w.send(batch_request("t", [b"probe"]))
            reply = await w.reply()
            if reply.startswith(b"OK "):
                break
            assert reply == b"ERR not enough replicas\r\n"
            await trio.sleep(0.05)
    acked: list[int] = []
    reqs = [batch_request("t", [b"m%d" % i]) for i in range(300)]
    await w.send(b"".join(reqs))
    for _ in reqs:
        reply = await w.reply()
        assert reply.startswith(b"OK "), reply
        acked.append(int(reply.split()[1]))
    b.proc.kill()  # kill -9 right after the OKs: each acknowledged batch must already be on its disk
    await b.proc.wait()
    on_b = frames_of(tmp_path / "b", "t")
    ends = {0}
    pos = 0
    for f in on_b:
        pos += len(f)
        ends.add(pos)
    assert all(off in ends and off + len(r) <= pos for off, r in zip(acked, reqs, strict=True))
    assert on_b[-300:] == reqs
    with trio.fail_after(20):  # without the follower, writes are refused once --replica-lag passes
        while True:
            await w.send(batch_request("t", [b"after"]))
            if await w.reply() == b"ERR not enough replicas\r\n":
                break
    b2 = await spawn(nursery, tmp_path / "b", *args)
    with trio.fail_after(20):  # back in sync: writes resume
        while True:
            await w.send(batch_request("t", [b"again"]))
            if (await w.reply()).startswith(b"OK "):
                break
            await trio.sleep(0.05)
    await stop(b2, leader)


async def test_a_restarted_leader_starts_a_new_epoch_that_followers_copy(nursery: trio.Nursery,
                                                                         tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")
    port = leader.port
    f = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"127.0.0.1:{port}")
    await write(leader, "t", 20, b"one")
    await converge(leader, f)
    await stop(leader)
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", "--host", f"127.0.0.1:{port}")
    assert b"leader epoch 2" in leader.log
    await write(leader, "t", 20, b"two")
    await converge(leader, f)
    await stop(f, leader)
    epochs = (tmp_path / "a" / "t" / "leader-epochs").read_text()
    assert epochs.splitlines()[0] == "1 0" and epochs.splitlines()[1].startswith("2 ")
    assert (tmp_path / "b" / "t" / "leader-epochs").read_text() == epochs
    assert log_files(tmp_path / "b") == log_files(tmp_path / "a")
