"""examples/deploy: the backup script on a live server, and the unit, config and Dockerfile
say what the server accepts and needs."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest
import trio
from logd_trio_cli.main import app
from typer.testing import CliRunner

from logd_trio.server.config import Notes, ServerConfig, load_config
from logd_trio.server.limits import FDS_PER_CONNECTION, fd_budget

from ..harness import REPO, make_config, start_server
from ..wire import Wire, batch_request

DEPLOY = REPO / "examples" / "deploy"


async def test_backup_of_a_live_server_restores_a_contiguous_prefix(nursery: trio.Nursery, tmp_path: Path) -> None:
    live = await start_server(nursery, make_config(tmp_path / "live", fsync="never", partition_size=4096,
                                                   partitions=3))
    written: dict[str, dict[int, bytes]] = {"a": {}, "b": {}}
    stop, enough = trio.Event(), trio.Event()

    async def writer(topic: str) -> None:
        w = await Wire.connect(live.host, live.port)
        n = 0
        while not stop.is_set():
            frame = batch_request(topic, [b"%s-%06d" % (topic.encode(), n) * 40])
            await w.send(frame)
            reply = await w.line()
            assert reply.startswith(b"OK "), reply
            written[topic][int(reply.split()[1])] = frame
            n += 1
            if min(len(v) for v in written.values()) >= 100:  # rotations and retention under way
                enough.set()

    async with trio.open_nursery() as writers:
        for topic in written:
            writers.start_soon(writer, topic)
        await enough.wait()
        result = await trio.run_process(["sh", str(DEPLOY / "backup.sh"), str(tmp_path / "live"),
                                         str(tmp_path / "copy")], capture_stdout=True, capture_stderr=True,
                                        check=False)
        stop.set()
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "copy" / "logd.lock").exists()
    await live.stop()
    restored = await start_server(nursery, make_config(tmp_path / "copy", fsync="never"))
    w = await Wire.connect(restored.host, restored.port)
    for topic, frames in written.items():
        await w.send(b"TAIL %s 1\r\n" % topic.encode())
        head, got = await w.read_reply()
        assert head.startswith(b"OK "), head
        offset, count = int(head.split()[1]), 0
        while True:  # every batch of the copy, in order: each the one written at its offset
            await w.send(b"READ %s %d 1\r\n" % (topic.encode(), offset))
            head, got = await w.read_reply()
            if head == b"ERR not found\r\n":
                break
            for frame in got:
                assert frames[offset] == frame
                offset += len(frame)
                count += 1
        ends = {o + len(f) for o, f in frames.items()}
        assert count > 0 and offset in ends  # the copy ends at a batch boundary of what was written
    await restored.stop()


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "logd.service")
    return unit


def test_the_unit_affords_the_default_fd_budget() -> None:
    service = _unit()["Service"]
    limit = int(service["LimitNOFILE"])
    c = ServerConfig()
    budget = fd_budget(limit, max_connections=c.max_connections, topics=c.topics, partitions=c.partitions,
                       http_connections=64)
    assert budget.shortfall == 0 and budget.max_connections == c.max_connections
    assert budget.reserve + c.max_connections * FDS_PER_CONNECTION <= limit
    assert int(service["TimeoutStopSec"]) > c.shutdown_timeout
    assert service["ExecStart"].endswith("logd serve --config /etc/logd/logd.toml")


def test_the_example_config_loads_without_warnings() -> None:
    notes: Notes = []
    c = load_config(file=DEPLOY / "logd.toml", env={}, notes=notes)
    assert [t for level, t in notes if level >= 30] == []
    assert (c.fsync, c.partitions, c.partition_size, c.file_mode) == ("always", 8, 256 << 20, 0o600)
    assert str(c.workdir) == _unit()["Service"]["ReadWritePaths"]


def test_the_docker_entrypoint_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"ENTRYPOINT (\[.*?\])", text.replace("\\\n", ""), re.S)
    assert m is not None
    argv = json.loads(m.group(1))
    assert argv[:2] == ["logd", "serve"]
    seen: list[ServerConfig] = []

    async def fake_run(config: ServerConfig) -> None:  # the CLI's handover, not the server under test
        seen.append(config)

    monkeypatch.setattr("logd_trio_cli.serve_cmd.run", fake_run)
    result = CliRunner().invoke(app, argv[1:], env={})
    assert result.exit_code == 0, result.output
    assert seen[0].http_address == ("0.0.0.0", 9100) and str(seen[0].workdir) == "/data"
