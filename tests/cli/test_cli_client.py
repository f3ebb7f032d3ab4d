"""`logd write/read/stats/config/topics/ping` through typer's CliRunner, with a
real server running in its own thread (the CLI calls trio.run itself)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import typer
from logd_trio_cli import info_cmds, read_cmd, write_cmd
from typer.testing import CliRunner

from logd_trio.server.app import serve
from logd_trio.server.config import ServerConfig

from ..client.ports import refused_address

app = typer.Typer()
for _module in (write_cmd, read_cmd, info_cmds):
    _module.register(app)


@contextmanager
def server_thread(workdir: Path, **options: Any) -> Iterator[str]:
    """A real server in its own thread (the CLI calls trio.run itself); yields its address."""
    ready: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.Event]] = queue.Queue()

    def run() -> None:
        async def main() -> None:
            shutdown = trio.Event()
            async with trio.open_nursery() as n:
                host, port = await n.start(
                    serve, ServerConfig(host="127.0.0.1:0", workdir=workdir, fsync="never", **options)
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


@pytest.fixture
def addr(tmp_path: Path) -> Iterator[str]:
    with server_thread(tmp_path / "data") as address:
        yield address


def invoke(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


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


def test_read_of_a_topic_that_does_not_exist_says_so(addr: str) -> None:
    code, out, err = invoke("read", "--host", addr, "--topic", "empty")
    assert (code, out) == (5, "") and err == "logd read: topic 'empty' does not exist\n"


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
    with refused_address() as host:
        code, _, err = invoke("write", "--host", host, "x")
        assert code == 3
        assert err.count("\n") == 1 and err.startswith("logd write: cannot connect")
        assert "Connection refused" in err and "Traceback" not in err
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


# ---------------------------------------------------------------- review 2

LOGD = [sys.executable, "-m", "logd_trio_cli.main"]


def read_back(addr: str, topic: str) -> list[bytes]:
    r = subprocess.run([*LOGD, "read", "--host", addr, "--topic", topic], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def _feed(fd: int, lines: int) -> None:
    """Write lines 1..N to the pipe until done or the reader has gone."""
    try:
        for start in range(1, lines + 1, 10_000):
            os.write(fd, "".join(f"{i}\n" for i in range(start, min(start + 10_000, lines + 1))).encode())
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("round", range(3))
def test_ctrl_c_mid_stream_stores_every_line_read(addr: str, round: int) -> None:
    """SIGINT while `logd write` is busy streaming a pipe: the exit flush stores every line it
    took, nothing is reported lost, exit code 130.  (Before the fix, a Ctrl-C landing in the
    writer's background tasks failed the exit flush, or left a half-built batch.)"""
    r, w = os.pipe()
    p = subprocess.Popen([*LOGD, "write", "--host", addr, "--topic", f"sig{round}", "--batch-size", "2000",
                          "--count"], stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(r)
    feeder = threading.Thread(target=_feed, args=(w, 3_000_000), daemon=True)
    feeder.start()
    assert p.stdout is not None
    for _ in range(200 + 100 * round):  # acknowledged batches: it is streaming now
        assert p.stdout.readline()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    feeder.join(60)
    assert p.returncode == 130, err
    assert b"not written" not in err and b"Traceback" not in err, err
    stored = read_back(addr, f"sig{round}")
    assert len(stored) > 1000
    # --count reports, also when interrupted, what was acknowledged
    assert err.startswith(b"%d messages, " % len(stored)) and err.endswith(b"logd write: interrupted\n"), err
    assert stored == [b"%d" % i for i in range(1, len(stored) + 1)]  # no gap, no duplicate


def test_write_into_a_closed_pipe_keeps_writing(addr: str) -> None:
    """`logd write ... | head -1`: stdout closes early; every message is still written, exit 0."""
    r, w = os.pipe()
    os.close(r)  # nobody reads the offsets
    data = "".join(f"{i}\n" for i in range(1, 50_001)).encode()
    p = subprocess.run([*LOGD, "write", "--host", addr, "--topic", "bp", "--batch-size", "200"], input=data,
                       stdout=w, stderr=subprocess.PIPE, timeout=120)
    os.close(w)
    assert p.returncode == 0, p.stderr
    assert p.stderr == b""
    assert read_back(addr, "bp") == data.splitlines()


@contextmanager
def stuck_peer() -> Iterator[str]:
    """A peer that answers CONFIG and never acknowledges a batch (a stuck disk)."""
    config = b"MaxBatchSize: 65536\r\n"
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    stop = threading.Event()

    def handle(c: socket.socket) -> None:
        buf = b""
        with c:
            while (data := c.recv(65536)) and not stop.is_set():
                buf += data
                while b"CONFIG\r\n" in buf:
                    buf = buf.replace(b"CONFIG\r\n", b"", 1)
                    c.sendall(b"MOK %d\r\n%s\r\n" % (len(config), config))

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_write_timeout_covers_acknowledgements() -> None:
    with stuck_peer() as host:
        p = subprocess.run([*LOGD, "write", "--host", host, "--timeout", "0.5", "x", "y"],
                           capture_output=True, timeout=60)
    assert p.returncode == 4, p.stderr
    assert b"not acknowledged within 0.5 s" in p.stderr
    assert p.stderr.count(b"\n") == 1


@pytest.mark.parametrize("args", [
    ["write", "--host", "127.0.0.1:99999", "x"],
    ["read", "--host", "127.0.0.1:0x1"],
    ["write", "--batch-size", "10", "x"],
    ["write", "--flush-interval", "-1", "x"],
    ["write", "--flush-interval", "inf", "x"],
    ["write", "--timeout", "0", "x"],
    ["ping", "--timeout", "-1"],
    ["read", "--format", "{offset:c}"],  # fine for offset 0 only: an OverflowError traceback later
    ["read", "--format", "{topic.x}"],
    ["read", "--topic", "no spaces"],  # exit 6 (as if the server refused it)
    ["write", "--topic", "a/b", "x"],
    ["read", "--host", "localhost::80"],
    ["read", "--host", "[]:80"],
    ["write", "--flush-interval", "1_000", "x"],
    ["write", "--flush-interval", "-0", "x"],
])
def test_bad_values_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr and "Invalid value" in result.stderr


def test_read_from_a_server_with_lower_max_messages(tmp_path: Path) -> None:
    with server_thread(tmp_path / "d", max_messages=100) as host:
        lines = [f"line{i}" for i in range(3000)]
        assert invoke("write", "--host", host, "--topic", "mm", input="\n".join(lines))[0] == 0
        code, out, err = invoke("read", "--host", host, "--topic", "mm")
        assert code == 0, err
        assert out.splitlines() == lines
        code, out, err = invoke("read", "--host", host, "--topic", "mm", "--offset", "0", "--limit", "5")
        assert (code, out.splitlines()) == (0, lines[:5])


def test_every_duration_flag_takes_the_one_grammar(addr: str) -> None:
    """``serve`` took 1m30s and ``write --flush-interval`` did not: one grammar now."""
    code, out, err = invoke("write", "--host", addr, "--topic", "dur", "--flush-interval", "1m30s",
                            "--timeout", "1m", "x")
    assert code == 0, err
    code, out, err = invoke("read", "--host", addr, "--topic", "dur", "--timeout", "500ms")
    assert (code, out) == (0, "x\n"), err


def test_read_positions_and_templates(addr: str) -> None:
    assert invoke("write", "--host", addr, "--topic", "pos", "-q", "a", "b", "c")[:2] == (0, "")
    assert invoke("write", "--host", addr, "--topic", "pos", "-q", "d", "e")[:2] == (0, "")
    code, out, err = invoke("read", "--host", addr, "--topic", "pos", "--format", "{offset}:{delta} {body}")
    assert code == 0, err
    lines = out.splitlines()
    assert [ln.split(" ")[1] for ln in lines] == ["a", "b", "c", "d", "e"]
    second = lines[1].split(" ")[0]  # OFFSET:DELTA of "b", inside the first batch
    assert invoke("read", "--host", addr, "--topic", "pos", "--offset", second)[1] == "b\nc\nd\ne\n"
    assert invoke("read", "--host", addr, "--topic", "pos", "--offset", "-2")[1] == "d\ne\n"
    assert invoke("read", "--host", addr, "--topic", "pos", "--offset", "-4")[1] == "b\nc\nd\ne\n"
    assert invoke("read", "--host", addr, "--topic", "pos", "--offset", "end")[:2] == (0, "")
    assert invoke("read", "--host", addr, "--topic", "pos", "--offset", "oldest", "-l", "1")[1] == "a\n"
    code, _, err = invoke("read", "--host", addr, "--topic", "pos", "--offset", "99999")
    assert code == 5 and "past the end of topic 'pos' (head is " in err
    code, _, err = invoke("read", "--host", addr, "--topic", "pos", "--format", "{nope}")
    assert code == 2 and "Invalid value" in err
    code, _, err = invoke("read", "--host", addr, "--topic", "pos", "--offset", "soon")
    assert code == 2 and "not a position" in err


def test_read_from_now_sees_only_new_messages(addr: str) -> None:
    assert invoke("write", "--host", addr, "--topic", "now", "-q", "old")[0] == 0
    reader = subprocess.Popen([*LOGD, "read", "--host", addr, "--topic", "now", "--from-now", "--limit", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for i in range(100):  # until the reader has seen one (it may start after the first few)
            assert invoke("write", "--host", addr, "--topic", "now", "-q", f"new{i}")[0] == 0
            try:
                out, err = reader.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            pytest.fail("the reader never saw a new message")
    finally:
        reader.kill()
        reader.wait()
    assert reader.returncode == 0, err
    assert out.decode().startswith("new") and out.count(b"\n") == 1


def test_follow_on_a_missing_topic_says_it_waits(addr: str) -> None:
    reader = subprocess.Popen([*LOGD, "read", "--host", addr, "--topic", "later", "--follow", "--limit", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = reader.stderr.readline() if reader.stderr else b""
        assert line == b"logd read: waiting for topic 'later' to exist\n"
        assert invoke("write", "--host", addr, "--topic", "later", "-q", "first")[0] == 0
        out, _ = reader.communicate(timeout=30)
    finally:
        reader.kill()
        reader.wait()
    assert out == b"first\n"


def test_write_count_summary_and_quiet(addr: str) -> None:
    code, out, err = invoke("write", "--host", addr, "--topic", "cnt", "-q", "--count", "x", "yy")
    assert (code, out) == (0, "") and err.startswith("2 messages, 0.0 MB in ")


def test_a_template_that_cannot_show_a_message_is_one_line() -> None:
    from logd_trio.core.replies import Message

    with pytest.raises(ValueError, match=r"^--format '\{offset:c\}' cannot show the message at 4000000:0: ") as caught:
        read_cmd._format(Message("t", 4_000_000, 0, b"x"), "{offset:c}", False)
    assert "\n" not in str(caught.value)


def test_version_flag_prints_the_package_version() -> None:
    from logd_trio_cli.main import app
    from typer.testing import CliRunner

    import logd_trio

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"logd-trio {logd_trio.__version__}\n"
