"""Two followers: their own --partitions do not change their files (retention follows the leader);
both down with --min-insync 2 refuses writes, one back resumes them; no acknowledged batch is missing
from the followers a --min-insync count needs, whichever follower stalls (seeded rounds)."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import trio

from ...harness import ServerProcess, spawn
from ...wire import Wire, batch_request
from .test_processes import SMALL, converge, frames_of, log_files, stop, write
from .test_watermark_processes import until_writable


async def test_followers_with_other_partitions_keep_the_leaders_files(nursery: trio.Nursery,
                                                                      tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", *SMALL)  # 3 partitions of 4 KiB
    addr = f"{leader.host}:{leader.port}"
    more = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", addr,
                       "--partition-size", "4096", "--partitions", "8")
    fewer = await spawn(nursery, tmp_path / "c", "--node-id", "c", "--replicate-from", addr,
                        "--partition-size", "4096", "--partitions", "2")
    await write(leader, "t", 400)  # many rotations: retention removes the oldest partitions
    want = await converge(leader, more, fewer)
    assert want["t"][0] > 0
    await stop(more, fewer, leader)
    files = log_files(tmp_path / "a")
    assert len([f for f in files if f.startswith("t/")]) == 3
    assert log_files(tmp_path / "b") == files and log_files(tmp_path / "c") == files


async def _reply(w: Wire) -> bytes:
    with trio.fail_after(30):
        return await w.reply()


async def test_both_followers_down_refuses_writes_and_one_back_resumes_them(nursery: trio.Nursery,
                                                                            tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", "--acks", "all", "--min-insync", "2",
                         "--replica-lag", "1s")
    addr = f"{leader.host}:{leader.port}"
    args = {n: ("--node-id", n, "--replicate-from", addr) for n in "bc"}
    b = await spawn(nursery, tmp_path / "b", *args["b"])
    c = await spawn(nursery, tmp_path / "c", *args["c"])
    await until_writable(leader, "t")
    for f in (b, c):
        f.proc.kill()
        await f.proc.wait()
    w = await Wire.connect(leader.host, leader.port)
    with trio.fail_after(20):  # once --replica-lag passes: refused, not acknowledged
        while True:
            await w.send(batch_request("t", [b"refused"]))
            reply = await _reply(w)
            if reply == b"ERR not enough replicas\r\n":
                break
            assert reply.startswith(b"OK "), reply
    await w.send(batch_request("t", [b"refused-again"]))
    assert await _reply(w) == b"ERR not enough replicas\r\n"  # at once
    c2 = await spawn(nursery, tmp_path / "c", *args["c"])
    with trio.fail_after(20):
        while True:
            await w.send(batch_request("t", [b"resumed"]))
            if (await _reply(w)).startswith(b"OK "):
                break
            await trio.sleep(0.05)
    await w.aclose()
    assert any(b"resumed" in f for f in frames_of(tmp_path / "c", "t"))
    await stop(c2, leader)


async def _kill(*procs: ServerProcess) -> None:
    for p in procs:
        p.proc.kill()
    for p in procs:
        await p.proc.wait()


async def test_no_acknowledged_batch_is_missing_from_the_followers_it_needed(nursery: trio.Nursery,
                                                                             tmp_path: Path) -> None:
    """--min-insync 2 with two followers: each OK means one follower at least holds the batch, so after
    kill -9 of both right after the OKs, every acknowledged batch is on the disk of b or c."""
    rng = random.Random(11)
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", "--acks", "all", "--min-insync", "2",
                         "--replica-lag", "10s")
    addr = f"{leader.host}:{leader.port}"
    args = {n: ("--node-id", n, "--replicate-from", addr) for n in "bc"}
    acked: list[bytes] = []
    for rnd in range(3):
        fs = {n: await spawn(nursery, tmp_path / n, *args[n]) for n in "bc"}
        await until_writable(leader, "t")
        stalled = fs[rng.choice("bc")]  # one follower stops mid-round: the other carries the acks
        w = await Wire.connect(leader.host, leader.port)
        reqs = [batch_request("t", [b"r%d-%d-%s" % (rnd, i, b"x" * rng.randrange(200))])
                for i in range(rng.randrange(50, 150))]
        half = len(reqs) // 2
        await w.send(b"".join(reqs[:half]))
        stalled.proc.send_signal(signal.SIGSTOP)
        await w.send(b"".join(reqs[half:]))
        for r in reqs:
            reply = await _reply(w)
            assert reply.startswith(b"OK "), reply
            acked.append(r)
        await _kill(*fs.values())  # SIGKILL works on a stopped process too
        await w.aclose()
        held = {f for n in "bc" if (tmp_path / n / "t").is_dir() for f in frames_of(tmp_path / n, "t")}
        missing = [r for r in acked if r not in held]
        assert not missing, f"round {rnd}: {len(missing)} acknowledged batches on no follower"
    fs = {n: await spawn(nursery, tmp_path / n, *args[n]) for n in "bc"}
    await converge(leader, *fs.values())
    await stop(*fs.values(), leader)
    files = log_files(tmp_path / "a")
    assert log_files(tmp_path / "b") == files == log_files(tmp_path / "c")
