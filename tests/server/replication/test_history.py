"""A follower never takes another history from its leader: a leader restarted with an empty data
directory is refused (nothing cut, one line saying how to recover, CLUSTER and STATS show it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import trio

from ...harness import ServerProcess, spawn
from ...wire import Wire
from .test_processes import converge, heads, log_files, stop, write


async def ask(srv: ServerProcess, request: bytes) -> bytes:
    w = await Wire.connect(srv.host, srv.port)
    try:
        await w.send(request)
        reply = await w.reply()
    finally:
        await w.aclose()
    assert reply.startswith(b"MOK "), reply
    return reply.split(b"\r\n", 1)[1]


async def stats(srv: ServerProcess) -> dict[str, str]:
    body = await ask(srv, b"STATS\r\n")
    return dict(line.decode().split(": ", 1) for line in body.split(b"\r\n") if b": " in line)


async def assert_halted(f: ServerProcess, why: bytes) -> None:
    """``f`` halted its replication for ``why``: said once (with the way out), shown by CLUSTER and STATS."""
    with trio.move_on_after(20):
        while b"replication halted" not in f.log:  # noqa: ASYNC110
            await trio.sleep(0.05)
    text = bytes(f.log).decode(errors="replace")
    lines = [line for line in text.splitlines() if "replication halted" in line]
    assert len(lines) == 1, text[-3000:]
    assert why.decode() in lines[0] and "empty data directory" in lines[0] and "copy of this node's" in lines[0]
    cluster = json.loads(await ask(f, b"CLUSTER\r\n"))
    assert why.decode() in cluster["halted"]
    assert (await stats(f))["replication.halted"] == "1"


async def test_a_leader_restarted_with_an_empty_directory_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")
    port = leader.port
    f = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"127.0.0.1:{port}")
    await write(leader, "t", 30, b"kept")
    want = await converge(leader, f)
    assert (await stats(f))["replication.halted"] == "0"
    copied = log_files(tmp_path / "b")
    await stop(leader)
    shutil.rmtree(tmp_path / "a")  # the leader's disk was replaced
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", "--host", f"127.0.0.1:{port}")
    await write(leader, "t", 40, b"new")  # more than b holds: offsets b has would be overwritten silently
    await write(leader, "u", 3, b"new")
    await assert_halted(f, b"holds another history")
    await trio.sleep(1.5)  # a listing of the leader's topics later: still nothing copied
    assert await heads(f) == {t: h for t, h in want.items()}
    assert log_files(tmp_path / "b") == copied  # nothing cut, nothing copied aside
    assert not any(".corrupt" in p.name for p in (tmp_path / "b").rglob("*"))
    await stop(f, leader)


async def test_a_followers_directory_can_replace_the_leaders(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The way out the halt names: the leader restarted on a copy of a follower's directory is followed."""
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")
    port = leader.port
    f = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"127.0.0.1:{port}")
    await write(leader, "t", 10, b"one")
    await converge(leader, f)
    await stop(leader)
    shutil.rmtree(tmp_path / "a")
    shutil.copytree(tmp_path / "b", tmp_path / "a")
    (tmp_path / "a" / "high-watermark").unlink(missing_ok=True)
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", "--host", f"127.0.0.1:{port}")
    await write(leader, "t", 10, b"two")
    await converge(leader, f)
    assert b"replication halted" not in f.log
    await stop(f, leader)
    assert log_files(tmp_path / "b") == log_files(tmp_path / "a")


async def test_a_halted_follower_resumes_once_the_leader_holds_its_history(nursery: trio.Nursery,
                                                                           tmp_path: Path) -> None:
    """The way out the halt names, taken while the follower runs: no restart of the follower."""
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a")
    port = leader.port
    f = await spawn(nursery, tmp_path / "b", "--node-id", "b", "--replicate-from", f"127.0.0.1:{port}")
    await write(leader, "t", 10, b"one")
    await converge(leader, f)
    await stop(leader)
    shutil.rmtree(tmp_path / "a")
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", "--host", f"127.0.0.1:{port}")
    await write(leader, "u", 3, b"new")
    await assert_halted(f, b"holds another history")
    assert "u" not in await heads(f)  # a halted follower starts no topic of the other history
    await stop(leader)
    shutil.rmtree(tmp_path / "a")
    shutil.copytree(tmp_path / "b", tmp_path / "a")  # the recipe: the follower's directory replaces the leader's
    leader = await spawn(nursery, tmp_path / "a", "--node-id", "a", "--host", f"127.0.0.1:{port}")
    await write(leader, "t", 5, b"two")
    await write(leader, "v", 2, b"new topic")
    want = await converge(leader, f)
    assert {"t", "v"} <= set(want) and b"replication from" in f.log and b"resumes" in f.log
    assert (await stats(f))["replication.halted"] == "0"
    await stop(f, leader)
