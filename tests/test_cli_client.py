"""`logd write/read/stats/config/topics/ping` through typer's CliRunner, with a
real server running in its own thread (the CLI calls trio.run itself)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import typer
from logd_trio_cli import client_cmds
from typer.testing import CliRunner

from logd_trio.config import ServerConfig
from logd_trio.server import serve

app = typer.Typer()
client_cmds.register(app)


@pytest.fixture
def addr(tmp_path: Path) -> Iterator[str]:
    ready: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.Event]] = queue.Queue()

    def run() -> None:
        async def main() -> None:
            shutdown = trio.Event()
            async with trio.open_nursery() as n:
                host, port = await n.start(
                    serve, ServerConfig(host="127.0.0.1:0", workdir=tmp_path / "data", fsync="never")
                )
                ready.put((f"{host}:{port}", trio.lowlevel.current_trio_token(), shutdown))
                await shutdown.wait()
                n.cancel_scope.cancel()

        trio.run(main)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    address, token, shutdown = ready.get(timeout=10)
    yield address
    trio.from_thread.run_sync(shutdown.set, trio_token=token)
    thread.join(10)


def invoke(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_write_args_and_stdin_then_read_raw_json_numbers(addr: str) -> None:
    code, out, _ = invoke("write", "--host", addr, "--topic", "t", "one", "two")
    assert code == 0 and out == "0\n"
    code, out, err = invoke("write", "--host", addr, "--topic", "t", "--count", input="three\n\nfour\r\nfive")
    assert code == 0 and out.strip().isdigit()
    assert "3 messages" in err
    code, out, _ = invoke("read", "--host", addr, "--topic", "t")
    assert (code, out) == (0, "one\ntwo\nthree\nfour\nfive\n")
    code, out, _ = invoke("read", "--host", addr, "--topic", "t", "--offset", "0", "--limit", "1", "-n")
    assert (code, out) == (0, "0:0\tone\n")
    code, out, _ = invoke("read", "--host", addr, "--topic", "t", "--limit", "2", "--format", "json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [{"topic": "t", "offset": 0, "delta": 0, "body": "one"},
                    {"topic": "t", "offset": 0, "delta": 12, "body": "two"}]


def test_read_empty_topic_is_not_an_error(addr: str) -> None:
    assert invoke("read", "--host", addr, "--topic", "empty") == (0, "", "")


def test_checkpoint_continues_where_it_stopped(addr: str, tmp_path: Path) -> None:
    invoke("write", "--host", addr, "--topic", "c", *[f"m{i}" for i in range(6)])
    cp = str(tmp_path / "cp.json")
    assert invoke("read", "--host", addr, "--topic", "c", "--checkpoint", cp, "--limit", "4")[1] == "m0\nm1\nm2\nm3\n"
    assert invoke("read", "--host", addr, "--topic", "c", "--checkpoint", cp)[1] == "m4\nm5\n"
    assert invoke("write", "--host", addr, "--topic", "c", "m6")[0] == 0
    saved = Path(cp).read_text()
    result = invoke("read", "--host", addr, "--topic", "c", "--checkpoint", cp)
    assert result[1] == "m6\n", (result, saved, Path(cp).read_text())


def test_info_commands(addr: str) -> None:
    invoke("write", "--host", addr, "--topic", "i", "x")
    code, out, _ = invoke("stats", "--host", addr)
    assert code == 0 and "requests.total:" in out
    code, out, _ = invoke("config", "--host", addr)
    assert code == 0 and "MaxBatchSize: 65536" in out
    code, out, _ = invoke("topics", "--host", addr)
    assert code == 0 and "i: 0 " in out
    code, out, _ = invoke("ping", "--host", addr)
    assert code == 0 and out.startswith("PONG from")


def test_no_server_one_line_error_and_exit_code() -> None:
    host = f"127.0.0.1:{free_port()}"
    code, _, err = invoke("write", "--host", host, "x")
    assert code == 3
    assert err.count("\n") == 1 and err.startswith("logd: error: cannot connect")
    assert "Traceback" not in err
    code, _, err = invoke("read", "--host", host, "-v")
    assert code == 3 and "Traceback" in err


def test_env_host_and_bad_flags(addr: str) -> None:
    result = CliRunner().invoke(app, ["ping"], env={"LOGD_HOST": addr})
    assert result.exit_code == 0
    code, _, err = invoke("read", "--host", addr, "--offset", "0", "--from-beginning")
    assert code == 2 and "--from-beginning" in err
    code, _, err = invoke("write", "--host", addr, "--flush-interval", "soon", "x")
    assert code == 2 and "not a duration" in err


def test_offset_not_a_batch_start(addr: str) -> None:
    invoke("write", "--host", addr, "--topic", "o", "x")
    code, _, err = invoke("read", "--host", addr, "--topic", "o", "--offset", "3")
    assert code == 5 and "not the start of a batch" in err


@pytest.mark.slow
def test_subprocess_round_trip_200k_lines(addr: str, tmp_path: Path) -> None:
    data = "".join(f"{i}\n" for i in range(1, 200_001))
    env = {**os.environ, "LOGD_HOST": addr}
    cmd = [sys.executable, "-m", "logd_trio_cli.main"]
    w = subprocess.run([*cmd, "write", "--topic", "seq", "--count"], input=data.encode(), env=env,
                       capture_output=True, timeout=120)
    assert w.returncode == 0, w.stderr
    assert b"200000 messages" in w.stderr
    r = subprocess.run([*cmd, "read", "--topic", "seq", "--offset", "0", "--limit", "200000"], env=env,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == data
