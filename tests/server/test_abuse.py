"""Hostile clients over real sockets: the server stays up, answers others,
keeps earlier data intact and buffers a bounded amount per connection."""

from __future__ import annotations

import random
import resource
from pathlib import Path

import pytest
import trio

from ..core.test_fuzz import mutate
from ..harness import make_config, start_server
from ..wire import Wire, batch_request

VALID = [
    batch_request("abuse", [b"hello", b"world"]),
    b"READ abuse 0 1\r\n",
    b"TAIL abuse 5\r\n",
    b"STATS\r\n",
    b"CONFIG\r\n",
    b"PING\r\n",
    b"TOPICS\r\n",
]


HOSTILE = [
    b"\x00" * 100_000,
    b"\n" * 1000,
    b"BATCH 18446744073709551615 t 0 1\r\n",
    b"BATCH 99999999999999999999999999 t 0 1\r\n",
    b"READ t 99999999999999999999999999 1\r\n" * 50,
    b"READ ../../etc/passwd 0 1\r\nTAIL ..%2f 1\r\nBATCH 10 ../x 1653298240 1\r\nMSG 1\r\nm\r\n",
    b"X" * 70_000 + b"\r\n",
    b"BATCH 60000 t 0 1\r\n" + b"M" * 100,  # stalls mid-body
    b"READ t 0 1 99999999999\r\n",
    bytes(range(256)) * 50,
]


async def _abuse(host: str, port: int, payload: bytes) -> None:
    try:
        w = await Wire.connect(host, port)
        with trio.move_on_after(1.5):
            await w.send(payload)
            await w.closed()
        await w.aclose()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _never_reads(host: str, port: int) -> None:
    """Pipelines many READs and never reads the replies."""
    try:
        w = await Wire.connect(host, port)
        with trio.move_on_after(2):
            for _ in range(2000):
                await w.send(b"READ abuse 0 50000\r\n" * 50)
        await w.aclose()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@pytest.mark.slow
async def test_abuse_leaves_server_healthy(nursery: trio.Nursery, tmp_path: Path) -> None:
    # idle_timeout is real time: the good connection waits a whole wave between its PINGs,
    # which takes seconds on a loaded machine, and it must not be closed as idle meanwhile.
    srv = await start_server(nursery, make_config(tmp_path / "d", timeout=1.0, idle_timeout=8.0))
    good = await Wire.connect(srv.host, srv.port)
    reqs = [batch_request("abuse", [b"precious %d" % i]) for i in range(20)]
    await good.send(b"".join(reqs))
    for _ in reqs:
        assert (await good.reply()).startswith(b"OK ")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    rng = random.Random(1774)
    payloads = list(HOSTILE) + [mutate(rng, rng.choice(VALID)) * rng.randint(1, 3) for _ in range(300)]
    async with trio.open_nursery() as n:
        for i in range(0, len(payloads), 40):  # 40 concurrent hostile connections at a time
            async with trio.open_nursery() as wave:
                for p in payloads[i : i + 40]:
                    wave.start_soon(_abuse, srv.host, srv.port, p)
                if i == 0:
                    for _ in range(4):
                        n.start_soon(_never_reads, srv.host, srv.port)
            # other clients are served throughout
            await good.send(b"PING\r\n")
            assert await good.reply() == b"PONG\r\n"

    await good.send(b"TAIL abuse 50000\r\n")
    _, frames = await good.read_reply()
    assert frames[: len(reqs)] == reqs  # earlier data intact
    assert not (tmp_path / "etc").exists() and not (tmp_path / "x").exists()  # no path traversal
    # every hostile connection, the ones that never read included, is gone
    with trio.fail_after(30):
        while True:
            await good.send(b"STATS\r\n")
            stats = (await good.reply()).decode()
            if "\r\nconns.active: 1\r\n" in stats:
                break
            await trio.sleep(0.1)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Bounded buffering: a few hundred hostile connections must not cost
    # hundreds of MB (ru_maxrss is in KiB on Linux; the test process also
    # holds the clients).
    assert rss_after - rss_before < 200 * 1024
