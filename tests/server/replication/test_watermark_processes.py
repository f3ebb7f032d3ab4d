"""High watermarks with real processes: a follower holding batches beyond the leader's high watermark
does not show them (READ or long-poll), and a leader restarted after kill -9 serves what was
acknowledged (its checkpoint), neither its unreplicated tail nor nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from ...harness import ServerProcess, spawn
from ...wire import Wire, batch_request
from .test_high_watermark import durable_head, read_frames
from .test_history import stats
from .test_processes import heads, stop, write

ACKS = ("--acks", "all", "--replica-lag", "10s")


async def until_writable(srv: ServerProcess, topic: str) -> None:
    """Until a BATCH is acknowledged (the followers it needs are in sync)."""
    with trio.fail_after(20):
        while True:
            w = await Wire.connect(srv.host, srv.port)
            await w.send(batch_request(topic, [b"probe"]))
            reply = await w.reply()
            await w.aclose()
            if reply.startswith(b"OK "):
                return
            await trio.sleep(0.05)


async def test_a_follower_never_shows_a_batch_beyond_the_leaders_high_watermark(nursery: trio.Nursery,
                                                                              tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", *ACKS, "--min-insync", "3")
    addr = f"{leader.host}:{leader.port}"
    b = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", addr)
    c = await spawn(nursery, tmp_path / "c", "--node-id", "c", "--replicate-from", addr)
    await until_writable(leader, "t")
    await write(leader, "t", 4)
    with trio.fail_after(10):  # b's readers see all 5 acknowledged batches (the high watermark reached b)
        while len(await read_frames(b.host, b.port, "t")) < 5:  # noqa: ASYNC110 (another process)
            await trio.sleep(0.02)
    hw = (await heads(b))["t"][1]
    c.proc.send_signal(signal.SIGSTOP)  # the batch below can reach b, not c: it stays beyond the high watermark
    try:
        w = await Wire.connect(leader.host, leader.port)
        await w.send(batch_request("t", [b"beyond"]))
        with trio.fail_after(10):  # durable on b (its own head moved past the high watermark)
            while (await heads(b))["t"][1] == hw:  # noqa: ASYNC110
                await trio.sleep(0.01)
        frames = await read_frames(b.host, b.port, "t")
        assert len(frames) == 5 and not any(b"beyond" in f for f in frames)
        poll = await Wire.connect(b.host, b.port)  # a long-poll at the high watermark waits too
        await poll.send(b"READ t %d 10 10000\r\n" % hw)
        with trio.move_on_after(0.5) as idle:
            await poll.line()
        assert idle.cancelled_caught, "the long-poll on b answered with a batch beyond the high watermark"
    finally:
        c.proc.send_signal(signal.SIGCONT)
    with trio.fail_after(10):
        assert (await w.reply()).startswith(b"OK ")
        head, got = await poll.read_reply()
    assert head == b"OK %d 1\r\n" % hw and b"beyond" in got[0]
    assert len(await read_frames(b.host, b.port, "t")) == 6
    await w.aclose()
    await poll.aclose()
    await stop(b, c, leader)


async def test_a_leader_killed_and_restarted_serves_what_was_acknowledged(nursery: trio.Nursery,
                                                                          tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", *ACKS, "--min-insync", "2")
    port = leader.port
    b = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"127.0.0.1:{port}")
    await until_writable(leader, "t")
    await write(leader, "t", 9)
    acked = await durable_head(leader.host, leader.port, "t")
    checkpoint = tmp_path / "a" / "high-watermark"
    with trio.fail_after(10):  # the checkpoint follows within a fraction of a second
        while not checkpoint.exists() or f"t {acked}\n" not in checkpoint.read_text():  # noqa: ASYNC110
            await trio.sleep(0.02)
    b.proc.send_signal(signal.SIGSTOP)
    try:
        w = await Wire.connect(leader.host, leader.port)
        await w.send(batch_request("t", [b"unreplicated"]))
        with trio.fail_after(10):  # fsynced on the leader, not acknowledged
            while await durable_head(leader.host, leader.port, "t") == acked:  # noqa: ASYNC110
                await trio.sleep(0.01)
        leader.proc.kill()
        await leader.proc.wait()
        leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", *ACKS, "--min-insync", "2",
                             "--host", f"127.0.0.1:{port}")
        frames = await read_frames(leader.host, leader.port, "t")
        assert len(frames) == 10 and not any(b"unreplicated" in f for f in frames)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    with trio.fail_after(20):  # b copies the tail: it is acknowledged by both, readable
        while len(await read_frames(leader.host, leader.port, "t")) < 11:  # noqa: ASYNC110
            await trio.sleep(0.05)
    await stop(b, leader)


async def test_stats_count_what_replication_moved(nursery: trio.Nursery, tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", *ACKS, "--min-insync", "2")
    b = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"{leader.host}:{leader.port}")
    await until_writable(leader, "t")
    await write(leader, "t", 50)
    head = (await heads(leader))["t"][1]
    with trio.fail_after(10):
        while (s := await stats(b))["replication.lag_bytes"] != "0":  # noqa: ASYNC110
            await trio.sleep(0.05)
    sl = await stats(leader)
    assert int(s["replication.bytes_fetched"]) == head == int(sl["replication.bytes_served"])
    assert sl["replication.insync"] == "2" and sl["replication.acks_waiting"] == "0"
    assert sl["replication.halted"] == "0"
    with trio.fail_after(10):  # the moved high watermark is checkpointed (once for many batches)
        while (n := int((await stats(leader))["replication.hw_checkpoints"])) < 1:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert n < 50
    b.proc.send_signal(signal.SIGSTOP)
    try:
        w = await Wire.connect(leader.host, leader.port)
        await w.send(batch_request("t", [b"waits"]))
        with trio.fail_after(10):
            while (await stats(leader))["replication.acks_waiting"] != "1":  # noqa: ASYNC110
                await trio.sleep(0.02)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    assert (await w.reply()).startswith(b"OK ")
    await w.aclose()
    await stop(b, leader)


async def test_a_topic_the_follower_cannot_create_yet_is_retried(nursery: trio.Nursery, tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")
    b = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"{leader.host}:{leader.port}")
    (tmp_path / "b" / "t2").write_bytes(b"")  # in the way of the topic's directory: creating it fails
    await write(leader, "t2", 5)
    with trio.fail_after(20):
        while b"cannot create it here" not in b.log:  # noqa: ASYNC110
            await trio.sleep(0.05)
    (tmp_path / "b" / "t2").unlink()  # the cause is gone: the next try succeeds
    with trio.fail_after(30):
        while (await heads(b)).get("t2") != (await heads(leader))["t2"]:  # noqa: ASYNC110
            await trio.sleep(0.05)
    await stop(b, leader)
