"""``logd bench`` and its engine run against a real server and report sane numbers.

Functional only: nothing here asserts a speed.  Also checks that the message
walk's fast paths (motivated by the benchmarks) agree with the exact walk.
"""

from __future__ import annotations

import collections
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
from ..harness import LocalServer, scripted_peer


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
                         in_flight=4, read_batches=3)
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


class _Outstanding:
    """A counting proxy in front of a real server: requests forwarded minus replies forwarded, per connection.

    A request counts once it is whole on the way in, its reply once it is
    whole on the way out (a READ reply: its ``OK`` line and every frame), so
    ``peak`` is the most requests a connection ever had waiting at the server.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.peak: list[int] = []  # one per connection
        self.requests: collections.Counter[bytes] = collections.Counter()

    async def handle(self, down: trio.SocketStream) -> None:
        host, _, port = self.upstream.rpartition(":")
        up = await trio.open_tcp_stream(host, int(port))
        index = len(self.peak)
        self.peak.append(0)
        kinds: collections.deque[bytes] = collections.deque()

        async def requests() -> None:
            buf = bytearray()
            while data := await down.receive_some(1 << 16):
                buf += data
                while (nl := buf.find(b"\r\n")) >= 0:
                    words = bytes(buf[:nl]).split(b" ")
                    size = int(words[1]) if words[0] == b"BATCH" else 0
                    if len(buf) < nl + 2 + size:
                        break
                    del buf[: nl + 2 + size]
                    kinds.append(words[0])
                    self.requests[words[0]] += 1
                    self.peak[index] = max(self.peak[index], len(kinds))
                await up.send_all(data)
            await up.send_eof()

        async def replies() -> None:
            buf = bytearray()
            frames = 0  # frames of the current READ reply still to come
            while data := await up.receive_some(1 << 16):
                buf += data
                while (nl := buf.find(b"\r\n")) >= 0:
                    words = bytes(buf[:nl]).split(b" ")
                    size = int(words[1]) if frames else 0
                    if len(buf) < nl + 2 + size:
                        break
                    del buf[: nl + 2 + size]
                    if frames:
                        frames -= 1
                    elif kinds[0] == b"READ" and words[0] == b"OK":
                        frames = int(words[2])
                    if not frames:
                        kinds.popleft()
                await down.send_all(data)

        async with up, trio.open_nursery() as nursery:
            nursery.start_soon(requests)
            nursery.start_soon(replies)


@pytest.mark.parametrize(("in_flight", "conns"), [(1, 1), (1, 3)])
async def test_engine_in_flight_1_waits_for_each_reply(server: LocalServer, nursery: trio.Nursery,
                                                       in_flight: int, conns: int) -> None:
    proxy = _Outstanding(server.addr)
    addr = await scripted_peer(nursery, proxy.handle)
    config = BenchConfig(host=addr, conns=conns, duration=0.3, size=4096, message_size=31, in_flight=in_flight)
    assert config.read_batches == 1  # one batch per READ, as Go's log-cli bench
    result = await run_bench(config)
    assert result.write is not None and result.read is not None
    assert proxy.peak == [1] * conns
    assert proxy.requests[b"BATCH"] == result.write.requests == result.write.batches > 0
    assert proxy.requests[b"READ"] == result.read.requests == result.read.batches > 0


async def test_engine_pipelined_has_more_than_one_in_flight(server: LocalServer, nursery: trio.Nursery) -> None:
    """The proxy can see a window: the pipelined mode through it peaks above one."""
    proxy = _Outstanding(server.addr)
    addr = await scripted_peer(nursery, proxy.handle)
    result = await run_bench(BenchConfig(host=addr, duration=0.3, size=4096, message_size=31, in_flight=8))
    assert result.read is not None and result.read.batches > result.read.requests  # 16 batches per READ
    assert 1 < proxy.peak[0] <= 8


@pytest.mark.parametrize("only_read", [False, True])
async def test_engine_in_flight_1_refused_request_is_an_error(nursery: trio.Nursery, only_read: bool) -> None:
    frame_len = len(make_frame("benchmark_0", 4096, 31)[0])

    async def refuse(stream: trio.SocketStream) -> None:
        """Answers TOPICS with three bench frames of benchmark_0, and any other request with ERR."""
        async with stream:
            buf = b""
            while b"\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            if buf.startswith(b"TOPICS"):
                body = b"benchmark_0: 0 %d" % (3 * frame_len)
                await stream.send_all(b"MOK %d\r\n%s\r\n" % (len(body), body))
                return
            await stream.send_all(b"ERR boom\r\n")
            await stream.receive_some(65536)  # until the bench closes

    addr = await scripted_peer(nursery, refuse)
    what = "READ" if only_read else "BATCH"
    with pytest.raises(BenchError, match=f"{what}.*ERR boom"):
        await run_bench(BenchConfig(host=addr, duration=1, size=4096, in_flight=1, write=not only_read))


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


async def test_cli_bench_in_flight_1_json(server: LocalServer) -> None:
    args = ["bench", "--host", server.addr, "--duration", "200ms", "--size", "8192", "--in-flight", "1", "--json"]
    result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(_app(), args))
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["in_flight"] == 1 and out["read_batches"] == 1
    for phase in ("write", "read"):
        assert out[phase]["requests"] == out[phase]["batches"] > 0
        assert out[phase]["requests_per_s"] > 0
    # --window is the old name of the same flag; --read-batches still overrides the default
    args = ["bench", "--host", server.addr, "--duration", "200ms", "--size", "8192", "--window", "2",
            "--read-batches", "3", "--json"]
    result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(_app(), args))
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["in_flight"] == 2 and out["read_batches"] == 3
    assert out["read"]["batches"] > out["read"]["requests"] > 0


def test_cli_bench_rejects_bad_flags() -> None:
    runner = CliRunner()
    for flags, word in ((["--in-flight", "0"], "--in-flight"), (["--window", "-3"], "--in-flight"),
                        (["--read-batches", "0"], "--read-batches"), (["--in-flight", "many"], "in-flight")):
        r = runner.invoke(_app(), ["bench", "--duration", "100ms", *flags])
        assert r.exit_code == 2, flags
        assert word in r.output and "Traceback" not in r.output, r.output
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


async def test_cli_bench_deletes_the_topics_it_created_unless_kept(server: LocalServer) -> None:
    from logd_trio.client.client import open_client

    async with open_client(server.addr) as c:
        await c.batch("mine_1", [b"kept: it existed before the run"])

    def bench(*extra: str) -> dict[str, object]:
        args = ["bench", "--host", server.addr, "--duration", "100ms", "--size", "4096", "--topics", "2",
                "--conns", "2", "--topic-prefix", "mine_", "--only-write", "--json", *extra]
        result = CliRunner().invoke(_app(), args)
        assert result.exit_code == 0, result.output
        out: dict[str, object] = json.loads(result.output)
        return out

    out = await trio.to_thread.run_sync(bench)
    assert out["deleted_topics"] == ["mine_0"]  # mine_1 was there before: written to, never deleted
    async with open_client(server.addr) as c:
        names = set(await c.topics())
    assert "mine_0" not in names and "mine_1" in names
    out = await trio.to_thread.run_sync(lambda: bench("--keep"))
    assert out["deleted_topics"] == []
    async with open_client(server.addr) as c:
        assert {"mine_0", "mine_1"} <= set(await c.topics())
