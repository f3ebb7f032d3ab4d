"""The server's log lines: what an operator sees at INFO/WARNING, -v, and --log-format json."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest
import trio

from logd_trio.server.logs import JsonFormatter, setup_logging

from ..harness import spawn
from ..wire import Wire, batch_request


async def test_json_log_of_a_real_server_process(nursery: trio.Nursery, tmp_path: Path) -> None:
    proc = await spawn(nursery, tmp_path / "d", "--log-format", "json", "-v", "--topics", "2",
                       "--partition-size", "300", "--partitions", "2", "--fsync", "always")
    w = await Wire.connect(proc.host, proc.port)
    local = w.stream.socket.getsockname()
    peer = f"{local[0]}:{local[1]}"
    for _ in range(6):  # 6 batches of ~210 bytes: a partition each, retention keeps 2
        await w.send(batch_request("t", [b"x" * 180]))
        assert (await w.line()).startswith(b"OK ")
    await w.send(batch_request("u", [b"y"]))  # a third topic: over --topics 2
    assert await w.line() == b"ERR maximum topics allowed\r\n"
    await w.send(b"CLOSE\r\n")
    assert await w.line() == b"OK\r\n"
    assert await w.closed()
    proc.proc.terminate()
    with trio.fail_after(15):
        await proc.proc.wait()
    assert proc.proc.returncode == 0
    lines = [json.loads(line) for line in proc.log.decode().splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) and r["time"].endswith("Z") for r in lines)
    said = [(r["level"], r["message"]) for r in lines]

    def has(level: str, *words: str) -> bool:
        return any(lvl == level and all(w in m for w in words) for lvl, m in said)

    assert has("INFO", "logd-trio", "starting")
    assert has("INFO", "topic t created")
    assert has("INFO", "topic t: partition", "started")
    assert has("INFO", "topic t: retention removes", ".log")
    assert has("WARNING", "refused BATCH from", peer, "maximum topics allowed")
    assert has("DEBUG", f"connection from {peer} opened") and has("DEBUG", f"connection from {peer} closed")
    assert has("INFO", "shut down cleanly")


def test_json_formatter_keeps_extras_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("logd_trio.x").makeRecord(
            "logd_trio.x", logging.ERROR, __file__, 1, "topic %s failed", ("t",), exc_info=sys.exc_info(),
            extra={"topic": "t", "peer": "127.0.0.1:5"})
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "topic t failed" and out["level"] == "ERROR" and out["topic"] == "t"
    assert out["peer"] == "127.0.0.1:5" and "ValueError: boom" in out["exception"]


def test_setup_logging_replaces_its_own_handler_and_checks_the_format() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers = []
        first, second = io.StringIO(), io.StringIO()
        setup_logging("text", stream=first)
        setup_logging("json", verbose=True, stream=second)
        logging.getLogger("logd_trio.t").debug("hello %d", 1)
        logging.getLogger("other.lib").info("quiet")  # libraries stay at WARNING
        assert first.getvalue() == ""
        assert [json.loads(x)["message"] for x in second.getvalue().splitlines()] == ["hello 1"]
        with pytest.raises(ValueError, match="log format"):
            setup_logging("xml")
    finally:
        root.handlers = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("logd_trio").setLevel(logging.NOTSET)
