"""``logd bench`` and its engine run against a real server and report sane numbers.

Functional only: nothing here asserts a speed.  Also checks that the message
walk's fast paths (motivated by the benchmarks) agree with the exact walk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import bench_cmd
from logd_trio.core.errors import InvalidBatchError
from logd_trio.core.framing import build_body, count_messages
from logd_trio.tools.bench import BenchConfig, BenchError, format_result, make_frame, run_bench

from ..client.ports import refused_address
from ..harness import LocalServer


def test_make_frame_fits_size() -> None:
    frame, count = make_frame("benchmark_0", 65500, 31)
    assert len(frame) <= 65500
    assert count > 1500
    body = frame[frame.index(b"\r\n") + 2 :]
    assert count_messages(body) == count
    # one more message would not fit
    assert len(make_frame("benchmark_0", len(frame) + 10, 31)[0]) <= len(frame) + 10


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="conns"):
        BenchConfig(conns=0)
    with pytest.raises(ValueError, match="nothing to do"):
        BenchConfig(write=False, read=False)


async def test_engine_write_then_read(server: LocalServer) -> None:
    config = BenchConfig(host=server.addr, conns=2, topics=2, duration=0.3, size=8192, message_size=100,
                         window=4, read_batches=3)
    result = await run_bench(config)
    assert result.write is not None and result.read is not None
    for phase in (result.write, result.read):
        assert phase.batches > 0
        assert phase.messages == phase.batches * result.messages_per_batch
        assert phase.seconds > 0 and phase.mib_per_s > 0
        p = phase.percentiles()
        assert 0 < p["min"] <= p["p50"] <= p["p90"] <= p["p99"] <= p["max"]
    assert result.write.bytes == result.write.batches * result.frame_size
    text = format_result(result)
    assert "write" in text and "read" in text and "p99" in text

    # --only-read finds the topics the write phase left
    only_read = await run_bench(BenchConfig(host=server.addr, conns=1, topics=2, duration=0.2, size=8192,
                                            message_size=100, write=False))
    assert only_read.write is None and only_read.read is not None and only_read.read.batches > 0


async def test_engine_only_read_of_a_missing_topic_fails(server: LocalServer) -> None:
    with pytest.raises(BenchError, match="missing or empty"):
        await run_bench(BenchConfig(host=server.addr, duration=0.1, write=False, topic_prefix="nobench_"))


def _app() -> typer.Typer:
    app = typer.Typer()
    bench_cmd.register(app)

    @app.command("noop")
    def noop() -> None:  # a second command so that "bench" stays a subcommand
        pass

    return app


async def test_cli_bench_prints_sane_numbers(server: LocalServer) -> None:
    args = ["bench", "--host", server.addr, "--duration", "300ms", "--size", "16384", "--message-size", "1000",
            "--conns", "2", "--json"]
    # typer's runner calls trio.run itself: run it in a thread beside the test's server.
    result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(_app(), args))
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["messages_per_batch"] == 16  # 16 x (8 + 1000 + 2) bytes and the BATCH line fit 16384
    for phase in ("write", "read"):
        assert out[phase]["batches"] > 0
        assert out[phase]["mib_per_s"] > 0
        assert set(out[phase]["latency_s"]) == {"min", "p50", "p90", "p99", "max"}

    human = await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(_app(), ["bench", "--host", server.addr, "--duration", "200ms", "--only-write"]))
    assert human.exit_code == 0, human.output
    assert "MiB/s" in human.output and "messages/s" in human.output and "read " not in human.output


def test_cli_bench_rejects_bad_flags() -> None:
    runner = CliRunner()
    r = runner.invoke(_app(), ["bench", "--only-write", "--only-read"])
    assert r.exit_code == 2
    r = runner.invoke(_app(), ["bench", "--duration", "soon"])
    assert r.exit_code == 2


def test_cli_bench_connection_refused(tmp_path: Path) -> None:
    with refused_address() as host:
        r = CliRunner().invoke(_app(), ["bench", "--host", host, "--duration", "100ms"])
    assert r.exit_code == 1
    assert "Connection refused" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("host", ["localhost", "[::1]", "::1", "127.0.0.1"])
def test_cli_bench_host_without_port_uses_the_default_port(host: str) -> None:
    """``--host localhost`` was a ValueError traceback; now it means localhost:1774."""
    assert BenchConfig(host=host).address[1] == 1774
    r = CliRunner().invoke(_app(), ["bench", "--host", "localhost:99999", "--duration", "100ms"])
    assert r.exit_code == 2 and "Traceback" not in r.output and "port" in r.output


def test_cli_bench_host_localhost_runs(tmp_path: Path) -> None:
    with refused_address() as host:
        port = host.rpartition(":")[2]
        r = CliRunner().invoke(_app(), ["bench", "--host", f"localhost:{port}", "--duration", "100ms"])
    assert r.exit_code == 1 and "Traceback" not in r.output


# ---------------------------------------------------------------- the message walk's fast paths


def _exact(body: bytes) -> int | str:
    """The reference walk, message by message."""
    pos, n = 0, 0
    while pos < len(body):
        if not body.startswith(b"MSG ", pos):
            return "invalid"
        nl = body.find(b"\r\n", pos + 4, min(pos + 26, len(body)))
        if nl < 0 or not body[pos + 4 : nl].isdigit():
            return "invalid"
        pos = nl + 2 + int(body[pos + 4 : nl])
        if pos + 2 > len(body) or not body.startswith(b"\r\n", pos):
            return "invalid"
        pos += 2
        n += 1
    return n or "invalid"


def _fast(body: bytes) -> int | str:
    try:
        return count_messages(body)
    except InvalidBatchError:
        return "invalid"


_messages = st.lists(st.binary(max_size=12) | st.sampled_from([b"MSG 1\r\n", b"\r\n", b"ab"]), max_size=8)


@settings(max_examples=400, deadline=None)
@given(_messages, st.booleans(), st.lists(st.tuples(st.integers(0, 300), st.binary(min_size=1, max_size=3)),
                                         max_size=2))
def test_count_messages_fast_paths_match_exact_walk(messages: list[bytes], same: bool,
                                                    edits: list[tuple[int, bytes]]) -> None:
    if same and messages:
        messages = [messages[0]] * len(messages)  # the equal-length fast path
    body = bytearray(build_body(messages))
    for at, rep in edits:
        if body:
            at %= len(body)
            body[at : at + len(rep)] = rep
    assert _fast(bytes(body)) == _exact(bytes(body))
