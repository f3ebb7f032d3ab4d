"""The stats task samples what it reports from the one owner of each number."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from logd_trio import __version__
from logd_trio.core import requests as p
from logd_trio.server.config import ServerConfig
from logd_trio.server.stats import Counters, Stats, StatsRequest, TopicView

from ..harness import make_config, start_server
from ..wire import Wire


def _body(reply: bytes) -> dict[str, str]:
    head, _, body = reply.partition(b"\r\n")
    assert head.startswith(b"MOK ")
    return dict(line.split(": ", 1) for line in body.decode().splitlines() if line)


def test_answers_sample_the_owners_at_request_time() -> None:
    topics = {"a": TopicView(0, 10, 1, 2)}
    open_conns = [3]
    stats = Stats(ServerConfig(host="127.0.0.1:0"), Counters(), lambda: topics)
    assert _body(stats.answer(p.Config()))["Host"] == "127.0.0.1:0"  # not listening yet
    stats.listening("127.0.0.1:4242", lambda: open_conns[0])
    assert _body(stats.answer(p.Config()))["Host"] == "127.0.0.1:4242"
    first = _body(stats.answer(p.Stats()))
    assert (first["conns.active"], first["topic.a.head"], first["version"]) == ("3", "10", __version__)
    open_conns[0] = 1
    topics["b"] = TopicView(5, 7, 0, 0)
    second = _body(stats.answer(p.Stats()))
    assert (second["conns.active"], second["topics.total"], second["topic.b.first"]) == ("1", "2", "5")
    assert _body(stats.answer(p.Topics())) == {"a": "0 10", "b": "5 7"}


async def test_config_host_is_the_bound_address_and_active_follows_closes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d"))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"CONFIG\r\n")
    assert _body(await w.reply())["Host"] == f"{srv.host}:{srv.port}"
    others = [await Wire.connect(srv.host, srv.port) for _ in range(3)]
    for o in others:
        await o.send(b"PING\r\n")
        assert await o.reply() == b"PONG\r\n"
    await w.send(b"STATS\r\n")
    assert _body(await w.reply())["conns.active"] == "4"
    for o in others:
        await o.send(b"CLOSE\r\n")
        assert await o.reply() == b"OK\r\n"
        assert await o.closed()
    with trio.fail_after(5):
        while True:
            await w.send(b"STATS\r\n")
            if _body(await w.reply())["conns.active"] == "1":
                break
            await trio.sleep(0.01)


async def test_a_failing_answer_costs_one_request(caplog: pytest.LogCaptureFixture) -> None:
    """A bug while sampling (here: the topic views raise) answers ERR and is logged; the stats task
    goes on (the old one died, and took the server with it)."""
    broken = [True]

    def topics() -> dict[str, TopicView]:
        if broken[0]:
            raise RuntimeError("sampling bug")
        return {}

    stats = Stats(ServerConfig(host="127.0.0.1:0"), Counters(), topics)
    async with trio.open_nursery() as n:
        await n.start(stats.run)
        first, second = StatsRequest(p.Stats()), StatsRequest(p.Config())
        await stats.requests.send(first)
        await first.done.wait()
        assert first.reply == b"ERR internal error\r\n"
        await stats.requests.send(second)
        await second.done.wait()
        assert second.reply.startswith(b"MOK ")
        broken[0] = False
        third = StatsRequest(p.Topics())
        await stats.requests.send(third)
        await third.done.wait()
        assert third.reply.startswith(b"MOK ")
        stats.close()
    assert [r for r in caplog.records if "STATS" in r.getMessage() and r.exc_info]  # logged, with the traceback


async def test_config_host_of_an_ipv6_listener_is_bracketed(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "d", host="[::1]:0"))
    w = await Wire.connect("::1", srv.port)
    await w.send(b"CONFIG\r\n")
    assert _body(await w.reply())["Host"] == f"[::1]:{srv.port}"  # was "::1:<port>", which no client parses
    await srv.stop()
