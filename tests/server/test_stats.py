"""The stats task samples what it reports from the one owner of each number."""

from __future__ import annotations

from pathlib import Path

import trio

from logd_trio import __version__
from logd_trio.core import requests as p
from logd_trio.server.config import ServerConfig
from logd_trio.server.stats import Counters, Stats, TopicView

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
