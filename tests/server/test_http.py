"""``--http-host``: /metrics, /healthz and /readyz of a real server over real sockets.

Metrics are scraped with an HTTP client and parsed with prometheus_client's
own parser while raw-protocol clients load the server; every counter must move
by exactly what the clients sent and received.
"""

from __future__ import annotations

import errno
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from logd_trio_cli.main import app
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from logd_trio.server.app import serve
from logd_trio.server.config import ConfigError, ServerConfig, load_config
from logd_trio.server.histogram import Histogram
from logd_trio.server.http import MAX_REQUESTS

from ..harness import make_config, spawn
from ..wire import Wire, batch_request
from .test_server import FailingCalls

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Server:
    http: str  # base URL of the monitoring endpoints
    shutdown: trio.Event
    stopped: trio.Event  # serve() returned
    listening: trio.Event
    addr: list[tuple[str, int]]

    @property
    def host(self) -> str:
        return self.addr[0][0]

    @property
    def port(self) -> int:
        return self.addr[0][1]


async def start(nursery: trio.Nursery, config: ServerConfig, *, wait_listening: bool = True) -> Server:
    """serve() in ``nursery``; returns once the monitoring endpoint is bound (and, by default, logd listens)."""
    shutdown, stopped, bound, listening = trio.Event(), trio.Event(), trio.Event(), trio.Event()
    http: list[tuple[str, int]] = []
    addr: list[tuple[str, int]] = []

    def on_http(a: tuple[str, int]) -> None:
        http.append(a)
        bound.set()

    async def run(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(config, shutdown=shutdown, on_http_bound=on_http, task_status=task_status)
        finally:
            stopped.set()

    async def starter() -> None:
        addr.append(await nursery.start(run))
        listening.set()

    nursery.start_soon(starter)
    with trio.fail_after(10):
        await bound.wait()
        if wait_listening:
            await listening.wait()
    return Server(f"http://{http[0][0]}:{http[0][1]}", shutdown, stopped, listening, addr)


@asynccontextmanager
async def http_client(srv: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.http, timeout=10, trust_env=False) as c:
        yield c


async def scrape(c: httpx.AsyncClient) -> Samples:
    r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def v(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after[key] - before.get(key, 0.0)


class Tally:
    """A raw client that counts every byte it sends and receives."""

    def __init__(self, w: Wire) -> None:
        self.w = w
        self.sent = 0
        self.received = 0

    async def send(self, data: bytes) -> None:
        await self.w.send(data)
        self.sent += len(data)

    async def reply(self) -> bytes:
        r = await self.w.reply()
        self.received += len(r)
        return r

    async def read_reply(self) -> tuple[bytes, list[bytes]]:
        head, frames = await self.w.read_reply()
        self.received += len(head) + sum(map(len, frames))
        return head, frames


def check_histogram(samples: Samples, name: str) -> None:
    buckets = sorted((float(dict(labels)["le"]), value) for (n, labels), value in samples.items()
                     if n == f"{name}_bucket")
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert buckets[-1][0] == float("inf") and buckets[-1][1] == v(samples, f"{name}_count")


async def test_metrics_move_by_exactly_the_load_sent(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start(nursery, make_config(tmp_path / "d", fsync="always", http_host="127.0.0.1:0"))
    async with http_client(srv) as http:
        before = await scrape(http)
        clients = [Tally(await Wire.connect(srv.host, srv.port)) for _ in range(2)]
        per_client = 10
        for i, (c, topic) in enumerate(zip(clients, ("a", "b"), strict=True)):
            reqs = [batch_request(topic, [b"c%d-b%d" % (i, j), b"x" * (j * 7)]) for j in range(per_client)]
            await c.send(b"".join(reqs))  # pipelined
            for _ in reqs:
                assert (await c.reply()).startswith(b"OK ")
            await c.send(f"READ {topic} 0 100\r\n".encode())
            head, frames = await c.read_reply()
            assert head.startswith(b"OK ") and len(frames) == per_client
            await c.send(f"TAIL {topic} 4\r\n".encode())
            assert (await c.read_reply())[0].startswith(b"OK ")
            await c.send(b"PING\r\n")
            assert await c.reply() == b"PONG\r\n"
        c0 = clients[0]
        await c0.send(b"READ nosuch 0 1\r\n")
        assert await c0.reply() == b"ERR not found\r\n"
        await c0.send(b"BOGUS\r\n")
        assert (await c0.reply()).startswith(b"ERR ")

        # A long-poll at the head of "a" waits; the gauge shows it, a new batch releases it.
        poller = Tally(await Wire.connect(srv.host, srv.port))
        await c0.send(b"TOPICS\r\n")
        heads = {line.split(b": ")[0]: line.split(b": ")[1].split() for line in
                 (await c0.reply()).split(b"\r\n")[1:-1] if line}
        await poller.send(b"READ a %s 1 20000\r\n" % heads[b"a"][1])
        with trio.fail_after(10):
            while v(mid := await scrape(http), "logd_longpolls_waiting") != 1:
                pass
        assert v(mid, "logd_connections") == 3
        await c0.send(batch_request("a", [b"wake"]))
        assert (await c0.reply()).startswith(b"OK ")
        head, frames = await poller.read_reply()
        assert head.startswith(b"OK ") and len(frames) == 1
        await c0.send(b"TOPICS\r\n")
        topics_reply = await c0.reply()

        after = await scrape(http)
        everyone = [*clients, poller]
        assert all(not c.w.buf for c in everyone)  # every reply was read whole
        assert delta(after, before, "logd_received_bytes_total") == sum(c.sent for c in everyone)
        assert delta(after, before, "logd_sent_bytes_total") == sum(c.received for c in everyone)
        batches = 2 * per_client + 1
        expected = {"batch": batches, "read": 2 + 1 + 1, "tail": 2, "ping": 2, "topics": 2, "stats": 0}
        for cmd, n in expected.items():
            assert delta(after, before, "logd_requests_total", command=cmd) == n, cmd
        assert delta(after, before, "logd_request_errors_total", command="read") == 1
        assert delta(after, before, "logd_request_errors_total", command="batch") == 0
        assert delta(after, before, "logd_errors_total", kind="not_found") == 1
        assert delta(after, before, "logd_errors_total", kind="protocol") == 1
        assert delta(after, before, "logd_errors_total", kind="storage") == 0
        assert v(after, "logd_longpolls_waiting") == 0
        assert v(after, "logd_connections") == 3
        assert delta(after, before, "logd_connections_accepted_total") == 3

        # Histograms: one observation per acknowledged batch and per answered READ/TAIL.
        for name in ("logd_batch_latency_seconds", "logd_read_latency_seconds", "logd_fsync_latency_seconds",
                     "logd_batches_per_fsync"):
            check_histogram(after, name)
        assert delta(after, before, "logd_batch_latency_seconds_count") == batches
        assert delta(after, before, "logd_batch_latency_seconds_sum") > 0
        assert delta(after, before, "logd_read_latency_seconds_count") == 2 + 2 + 1
        fsyncs = sum(delta(after, before, "logd_topic_fsyncs_total", topic=t) for t in ("a", "b", "default"))
        assert fsyncs >= 1
        assert delta(after, before, "logd_fsync_latency_seconds_count") == fsyncs
        assert delta(after, before, "logd_batches_per_fsync_sum") == batches  # --fsync always: all via fsync

        # Per-topic gauges match TOPICS.
        lines = [line for line in topics_reply.split(b"\r\n")[1:] if b": " in line]
        listed = {n.decode(): tuple(map(int, rest.split())) for n, rest in (line.split(b": ") for line in lines)}
        assert set(listed) == {"a", "b", "default"}
        assert v(after, "logd_topics") == 3
        for name, (first, head_) in listed.items():
            assert v(after, "logd_topic_first", topic=name) == first
            assert v(after, "logd_topic_head", topic=name) == head_
            assert v(after, "logd_topic_bytes", topic=name) == head_ - first
            assert v(after, "logd_topic_read_only", topic=name) == 0
        assert v(after, "logd_topic_head", topic="a") > 0
        assert v(after, "logd_ready") == 1


async def test_two_servers_in_one_process_keep_their_own_metrics(nursery: trio.Nursery, tmp_path: Path) -> None:
    one = await start(nursery, make_config(tmp_path / "1", fsync="never", http_host="127.0.0.1:0"))
    two = await start(nursery, make_config(tmp_path / "2", fsync="never", http_host="127.0.0.1:0"))
    w = await Wire.connect(one.host, one.port)
    for _ in range(3):
        await w.send(batch_request("t", [b"m"]))
        assert (await w.reply()).startswith(b"OK ")
    async with http_client(one) as h1, http_client(two) as h2:
        m1, m2 = await scrape(h1), await scrape(h2)
    assert v(m1, "logd_requests_total", command="batch") == 3
    assert v(m2, "logd_requests_total", command="batch") == 0
    assert ("logd_topic_head", frozenset({("topic", "t")})) not in m2


async def test_health_ready_and_http_basics(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start(nursery, make_config(tmp_path / "d", http_host="127.0.0.1:0"))
    async with http_client(srv) as http:
        r = await http.get("/healthz")
        assert (r.status_code, r.text) == (200, "ok\n")
        r = await http.get("/readyz")
        assert (r.status_code, r.text) == (200, "ready\n")
        assert (await http.get("/nothing")).status_code == 404
        r = await http.post("/metrics", content=b"x")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        r = await http.head("/metrics")
        assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
        r = await http.get("/metrics?name[]=x")  # a query string does not change the path
        assert r.status_code == 200 and "logd_requests_total" in r.text
        r = await http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert r.headers["content-type"].startswith("application/openmetrics-text") and r.text.endswith("# EOF\n")
    # Garbage gets a 400 and the connection closes; the server goes on.
    host, port = srv.http.removeprefix("http://").rsplit(":", 1)
    s = await trio.open_tcp_stream(host, int(port))
    await s.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    got = b""
    with trio.fail_after(10):
        while chunk := await s.receive_some(4096):
            got += chunk
    assert got.startswith(b"HTTP/1.1 400 ")
    await s.aclose()
    async with http_client(srv) as http:
        assert (await http.get("/healthz")).status_code == 200


async def _raw(srv: Server, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; everything the server sends until it closes."""
    host, port = srv.http.removeprefix("http://").rsplit(":", 1)
    s = await trio.open_tcp_stream(host, int(port))
    await s.send_all(request)
    got = b""
    with trio.fail_after(10):
        while chunk := await s.receive_some(4096):
            got += chunk
    await s.aclose()
    return got


async def test_hostile_requests_cost_one_connection_never_the_server(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start(nursery, make_config(tmp_path / "d", http_host="127.0.0.1:0"))
    # A target urlsplit cannot parse: 400, and both the monitoring and the logd port go on.
    for target in (b"//[x", b"http://[/"):
        got = await _raw(srv, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 400 "), got
    # An error reply to HEAD is sent without a body (h11 refuses one), not dropped.
    got = await _raw(srv, b"HEAD /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000)
    assert got.startswith(b"HTTP/1.1 413 ") and got.endswith(b"\r\n\r\n"), got[:200]
    # A header block over the limit: 431, at most one receive past MAX_HEAD.
    got = await _raw(srv, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 21_000 + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 431 "), got[:200]
    async with http_client(srv) as http:
        assert (await http.get("/healthz")).status_code == 200
    w = await Wire.connect(srv.host, srv.port)
    await w.send(b"PING\r\n")
    assert await w.line() == b"PONG\r\n"
    await w.aclose()


async def test_a_keep_alive_connection_is_closed_after_max_requests(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start(nursery, make_config(tmp_path / "d", http_host="127.0.0.1:0"))
    got = await _raw(srv, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n" * (MAX_REQUESTS + 5))
    assert got.count(b"HTTP/1.1 200 ") == MAX_REQUESTS  # then "Connection: close" and the socket closes
    last = got[got.rindex(b"HTTP/1.1 200 "):]
    assert b"connection: close" in last.lower() and last.endswith(b"\r\n\r\nok\n")


async def test_readyz_fails_during_shutdown_and_the_http_server_stops_with_the_server(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "d", fsync="never", http_host="127.0.0.1:0", shutdown_timeout=60.0)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:  # exits only once every task of the server ended
            srv = await start(nursery, cfg)
            w = await Wire.connect(srv.host, srv.port)
            big = [b"y" * 60000]
            for _ in range(5):  # 300 batches of 60 kB: far more than the socket buffers hold
                await w.send(b"".join(batch_request("big", big) for _ in range(60)))
                for _ in range(60):
                    assert (await w.reply()).startswith(b"OK ")
            # A reader that stops reading keeps its READ (and so the shutdown) in progress.
            hog = trio.socket.socket()
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await hog.connect((srv.host, srv.port))
            hog_stream = trio.SocketStream(hog)
            await hog_stream.send_all(b"READ big 0 300\r\n")
            assert (await hog_stream.receive_some(64)).startswith(b"OK 0 300\r\n")
            async with http_client(srv) as http:
                assert (await http.get("/readyz")).status_code == 200
                srv.shutdown.set()
                r = await http.get("/readyz")
                assert (r.status_code, r.text) == (503, "not ready: shutting down\n")
                assert (await http.get("/healthz")).status_code == 200
                assert v(await scrape(http), "logd_ready") == 0
                assert not srv.stopped.is_set()
            await hog_stream.aclose()  # the READ fails, the shutdown completes
            with trio.fail_after(30):
                await srv.stopped.wait()
    with pytest.raises(OSError):  # nothing listens on the monitoring port any more
        host, port = srv.http.removeprefix("http://").rsplit(":", 1)
        await trio.open_tcp_stream(host, int(port))


async def test_readyz_fails_until_recovery_is_done(nursery: trio.Nursery, tmp_path: Path) -> None:
    # Hold every worker-thread token: recovering topics waits for one (the data
    # directory and its lock, before it, have a thread limiter of their own).
    limiter = trio.to_thread.current_default_thread_limiter()
    borrowers = [object() for _ in range(int(limiter.total_tokens))]
    for b in borrowers:
        await limiter.acquire_on_behalf_of(b)
    try:
        srv = await start(nursery, make_config(tmp_path / "d", http_host="127.0.0.1:0"), wait_listening=False)
        async with http_client(srv) as http:
            assert (await http.get("/healthz")).status_code == 200
            r = await http.get("/readyz")
            assert (r.status_code, r.text) == (503, "not ready: starting: recovering topics\n")
            assert v(await scrape(http), "logd_ready") == 0
    finally:
        for b in borrowers:
            limiter.release_on_behalf_of(b)
    with trio.fail_after(10):
        await srv.listening.wait()
    async with http_client(srv) as http:
        assert (await http.get("/readyz")).status_code == 200


async def test_readyz_fails_when_a_topic_is_read_only(
    nursery: trio.Nursery, tmp_path: Path, syscall_layer: Callable[[FailingCalls], FailingCalls]
) -> None:
    srv = await start(nursery, make_config(tmp_path / "d", http_host="127.0.0.1:0"))
    w = await Wire.connect(srv.host, srv.port)
    await w.send(batch_request("ff", [b"good"]))
    assert await w.reply() == b"OK 0 1\r\n"
    syscall_layer(FailingCalls("fdatasync", 1, errno.EIO))  # fault injection through the storage seam
    await w.send(batch_request("ff", [b"lost"]))
    assert (await w.reply()).startswith(b"ERR storage error: fsync failed")
    async with http_client(srv) as http:
        r = await http.get("/readyz")
        assert (r.status_code, r.text) == (503, "not ready: read-only after an I/O error: ff\n")
        assert (await http.get("/healthz")).status_code == 200  # reads still work: alive
        m = await scrape(http)
    assert v(m, "logd_topic_read_only", topic="ff") == 1 and v(m, "logd_topic_read_only", topic="default") == 0
    assert v(m, "logd_errors_total", kind="storage") == 1
    assert v(m, "logd_request_errors_total", command="batch") == 1
    assert v(m, "logd_batch_latency_seconds_count") == 1  # the failed batch is not observed
    assert v(m, "logd_fsync_latency_seconds_count") == 1  # nor the failed fsync


async def test_logd_serve_process_with_http_host(nursery: trio.Nursery, tmp_path: Path) -> None:
    proc = await spawn(nursery, tmp_path / "d", "--fsync", "never", "--http-host", "127.0.0.1:0")
    m = re.search(rb"monitoring on (http://127\.0\.0\.1:\d+)", proc.log)
    assert m is not None
    url = m.group(1).decode()
    w = await Wire.connect(proc.host, proc.port)
    await w.send(batch_request("p", [b"one"]))
    assert (await w.reply()).startswith(b"OK ")
    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as http:
        assert (await http.get("/readyz")).status_code == 200
        samples = await scrape(http)
    assert v(samples, "logd_requests_total", command="batch") == 1
    proc.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        assert await proc.proc.wait() == 0  # the HTTP server does not keep the process alive
    assert b"shut down cleanly" in proc.log


@pytest.mark.parametrize("bad", ["nonsense", "127.0.0.1", "127.0.0.1:99999", "host:port", "a b:1", ":-1"])
def test_bad_http_host_is_a_one_line_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^http_host: expected HOST:PORT") as e:
        ServerConfig(http_host=bad)
    assert "\n" not in str(e.value)
    result = CliRunner().invoke(app, ["serve", "--http-host", bad])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert result.output.startswith("logd serve: http_host: expected HOST:PORT") and "Traceback" not in result.output


def test_http_host_is_off_unless_given() -> None:
    assert ServerConfig().http_address is None
    assert load_config(flags={"http_host": ""}, env={}).http_address is None  # Go's `--http-host ""`
    assert load_config(flags={"http_host": ":9100"}, env={}).http_address == ("127.0.0.1", 9100)
    assert load_config(env={"LOGD_HTTP_HOST": "0.0.0.0:9100"}).http_address == ("0.0.0.0", 9100)
    with pytest.raises(ConfigError, match="expected a string"):
        load_config(flags={"http_host": 9100}, env={})


def test_http_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--host", "127.0.0.1:0", "--workdir", str(tmp_path),
                                          "--http-host", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert result.output == f"logd serve: Address already in use (--http-host 127.0.0.1:{port})\n"


def test_histogram_buckets_are_prometheus_le_buckets() -> None:
    h = Histogram((0.001, 0.01, 1.0))
    for value in (0.0005, 0.001, 0.002, 0.01, 5.0):  # a value on a bound belongs to that bound's bucket
        h.observe(value)
    frozen = h.copy()
    h.observe(0.0)
    assert frozen.cumulative() == [(0.001, 2), (0.01, 4), (1.0, 4), (float("inf"), 5)]
    assert frozen.sum == pytest.approx(5.0135) and frozen.count == 5 and h.count == 6
    with pytest.raises(ValueError):
        Histogram((1.0, 1.0))
    with pytest.raises(ValueError):
        Histogram(())
