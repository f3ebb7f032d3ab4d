"""Failover time of a logd cluster: kill -9 the leader under a writer, time to the first OK from the new one.

Run from the repository root (etcd from ``/usr/bin/etcd``, Debian package ``etcd-server``)::

    python benchmarks/failover.py                  # 5 kills, 1 s leases, 3 etcd members
    python benchmarks/failover.py --kills 9 --lease-ttl 2 --json out.json

Three etcd members (loopback, fast raft timings: 25 ms heartbeat, 250 ms election) and three
``logd serve --etcd ... --acks all --min-insync 2`` nodes on loopback ports, data in a temporary
directory.  One writer sends one-message batches, one at a time, to the node CLUSTER names as the
leader, and finds the leader again after any refusal or lost connection.  Each round: wait for a
leader with two nodes in sync and for 50 acknowledged batches, SIGKILL the leader, and record the
time until the writer's first OK from another node; then restart the killed node (it rejoins as a
follower) and wait until it is in sync again.  Prints each round and the median.

``--throughput``: ``logd bench --conns 4 --only-write`` against a fixed leader with two
``--replicate-from`` followers and against a cluster leader of three nodes (both ``--acks all
--min-insync 2 --replica-lag 10s``), alternately for ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from logd_trio.core.framing import build_body
from logd_trio.core.requests import encode_batch

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
LISTENING = re.compile(rb"listening on ([0-9.]+):(\d+)")
REPLICA_LAG = ["2s"]  # the failover rounds; the throughput runs use 10s (the default) in both modes


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_etcd(root: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    ports = free_ports(6)
    names = [f"e{i}" for i in range(3)]
    initial = ",".join(f"{n}=http://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names))
    procs, urls = [], []
    for i, n in enumerate(names):
        url, peer = f"http://127.0.0.1:{ports[2 * i]}", f"http://127.0.0.1:{ports[2 * i + 1]}"
        log = open(root / f"{n}.log", "wb")  # noqa: SIM115 (kept open for the process's life)
        procs.append(subprocess.Popen(
            [ETCD, "--name", n, "--data-dir", str(root / n), "--listen-client-urls", url, "--advertise-client-urls",
             url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", initial,
             "--initial-cluster-state", "new", "--initial-cluster-token", f"bench-{ports[0]}",
             "--heartbeat-interval", "25", "--election-timeout", "250", "--log-level", "warn"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL))
        urls.append(url)
    return procs, urls


class Node:
    def __init__(self, name: str, root: Path, etcd: list[str], lease: int, extra: tuple[str, ...] = ()) -> None:
        self.name, self.workdir, self.etcd, self.lease = name, root / name, etcd, lease
        self.extra = extra
        self.proc: trio.Process | None = None
        self.addr: tuple[str, int] | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        cmd = [sys.executable, "-m", "logd_trio_cli.main", "serve", "--host", "127.0.0.1:0", "--workdir",
               str(self.workdir), "--node-id", self.name]
        if self.etcd:
            cmd += ["--etcd", ",".join(self.etcd), "--cluster", "bench", "--lease-ttl", f"{self.lease}s",
                    "--acks", "all", "--min-insync", "2", "--replica-lag", REPLICA_LAG[0]]
        cmd += self.extra
        self.proc = proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                                            stdout=subprocess.DEVNULL)
        found = trio.Event()
        buf = bytearray()

        async def pump() -> None:
            assert proc.stderr is not None
            async for chunk in proc.stderr:
                buf.extend(chunk)
                m = LISTENING.search(buf)
                if m and not found.is_set():
                    self.addr = (m.group(1).decode(), int(m.group(2)))
                    found.set()

        nursery.start_soon(pump)
        with trio.fail_after(20):
            await found.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)


async def request(addr: tuple[str, int], data: bytes, limit: float = 2.0) -> bytes:
    with trio.fail_after(limit):
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            await stream.send_all(data)
            buf = b""
            while b"\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise EOFError
                buf += chunk
            if buf.startswith(b"MOK "):
                n = int(buf[4:buf.index(b"\r\n")])
                while len(buf) < buf.index(b"\r\n") + 2 + n:
                    buf += await stream.receive_some(65536)
            return buf


async def view(node: Node) -> dict[str, Any] | None:
    if node.addr is None or node.proc is None or node.proc.returncode is not None:
        return None
    try:
        reply = await request(node.addr, b"CLUSTER\r\n")
    except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError):
        return None
    body = json.loads(reply.split(b"\r\n", 1)[1])
    return body if isinstance(body, dict) else None


async def leader_of(nodes: list[Node], in_sync: int = 2) -> Node:
    while True:
        for n in nodes:
            v = await view(n)
            if v and v.get("role") == "leader" and v.get("refusal") is None and len(v.get("in_sync", ())) >= in_sync:
                return n
        await trio.sleep(0.02)


def batch(topic: str, msg: bytes) -> bytes:
    return encode_batch(topic, build_body([msg]), 1)


async def writer(nodes: list[Node], acks: list[tuple[str, float]], stop: trio.Event) -> None:
    i = 0
    while not stop.is_set():
        leader = await leader_of(nodes, in_sync=2)
        assert leader.addr is not None
        try:
            stream = await trio.open_tcp_stream(*leader.addr)
        except OSError:
            continue
        async with stream:
            while not stop.is_set():
                try:
                    with trio.fail_after(3):
                        await stream.send_all(batch("t", b"m-%d" % i))
                        line = b""
                        while not line.endswith(b"\r\n"):
                            chunk = await stream.receive_some(4096)
                            if not chunk:
                                raise EOFError
                            line += chunk
                except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError):
                    break
                if not line.startswith(b"OK "):
                    break
                acks.append((leader.name, time.monotonic()))
                i += 1


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="logd-failover-"))
    etcd, urls = start_etcd(root)
    results: list[float] = []
    nodes = [Node(n, root, urls, args.lease_ttl) for n in "abc"]
    try:
        await trio.sleep(1.0)  # etcd members elect their raft leader
        async with trio.open_nursery() as nursery:
            for n in nodes:
                await n.start(nursery)
            acks: list[tuple[str, float]] = []
            stop = trio.Event()
            nursery.start_soon(writer, nodes, acks, stop)
            for k in range(args.kills):
                with trio.fail_after(60):  # a leader in sync with all, 50 OKs, the kill and the next OK
                    leader = await leader_of(nodes, in_sync=3)
                    start = len(acks)
                    while len(acks) < start + 50:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    killed = time.monotonic()
                    leader.kill()
                    assert leader.proc is not None
                    await leader.proc.wait()
                    while not any(node != leader.name and t > killed for node, t in acks[start:]):  # noqa: ASYNC110
                        await trio.sleep(0.005)
                took = min(t for node, t in acks[start:] if node != leader.name and t > killed) - killed
                results.append(took)
                print(f"kill {k + 1}: leader {leader.name} killed, first OK from the new leader after {took:.3f} s",
                      flush=True)
                await leader.start(nursery)  # it comes back as a follower
            stop.set()
            nursery.cancel_scope.cancel()
    finally:
        for n in nodes:  # also when a wait above failed or was interrupted
            n.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for n in nodes:
                if n.proc is not None:
                    await n.proc.wait()
        for p in etcd:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)
    out = {"lease_ttl_s": args.lease_ttl, "kills": len(results), "failover_s": results,
           "median_s": statistics.median(results), "min_s": min(results), "max_s": max(results)}
    print(f"median {out['median_s']:.3f} s (min {out['min_s']:.3f}, max {out['max_s']:.3f}) over {len(results)} kills, "
          f"--lease-ttl {args.lease_ttl}s")
    return out


async def bench(addr: tuple[str, int], seconds: float) -> dict[str, Any]:
    with trio.fail_after(20):  # the topic exists, and is on every node, before the timed phase
        while not (await request(addr, batch("benchmark_0", b"warm-up"))).startswith(b"OK "):  # noqa: ASYNC110
            await trio.sleep(0.05)
    out = await trio.run_process([sys.executable, "-m", "logd_trio_cli.main", "bench", "--host",
                                  f"{addr[0]}:{addr[1]}", "--conns", "4", "--duration", f"{seconds}s",
                                  "--only-write", "--json"], capture_stdout=True)
    result = json.loads(out.stdout)
    assert isinstance(result, dict)
    write = result["write"]
    assert isinstance(write, dict)
    return write


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """``logd bench --conns 4 --only-write`` against a fixed leader with two followers (``--acks all
    --min-insync 2``) and against a cluster leader with the same settings, alternately."""
    runs: dict[str, list[dict[str, Any]]] = {"fixed": [], "cluster": []}
    REPLICA_LAG[0] = "10s"
    for _ in range(args.rounds):
        for mode in ("fixed", "cluster"):
            root = Path(tempfile.mkdtemp(prefix="logd-cluster-bench-"))
            etcd: list[subprocess.Popen[bytes]] = []
            try:
                async with trio.open_nursery() as nursery:
                    if mode == "cluster":
                        etcd, urls = start_etcd(root)
                        await trio.sleep(1.0)
                        nodes = [Node(n, root, urls, args.lease_ttl) for n in "abc"]
                        for n in nodes:
                            await n.start(nursery)
                        leader = await leader_of(nodes, in_sync=3)
                    else:
                        leader = Node("a", root, [], 0, ("--acks", "all", "--min-insync", "2", "--replica-lag", "10s"))
                        await leader.start(nursery)
                        assert leader.addr is not None
                        source = ("--replicate-from", f"{leader.addr[0]}:{leader.addr[1]}")
                        nodes = [leader] + [Node(n, root, [], 0, source) for n in "bc"]
                        for n in nodes[1:]:
                            await n.start(nursery)
                    assert leader.addr is not None
                    try:
                        w = await bench(leader.addr, args.bench_seconds)
                    finally:
                        for n in nodes:
                            n.kill()
                        nursery.cancel_scope.cancel()
                    runs[mode].append(w)
                    print(f"{mode}: {w['mib_per_s']:.1f} MiB/s, {w['batches_per_s']:.0f} batches/s, "
                          f"p50 {w['latency_s']['p50'] * 1000:.1f} ms", flush=True)
            finally:
                for p in etcd:
                    p.kill()
                    p.wait()
                shutil.rmtree(root, ignore_errors=True)
    med = {m: statistics.median(r["mib_per_s"] for r in rs) for m, rs in runs.items()}
    print(f"median MiB/s: fixed leader {med['fixed']:.1f}, cluster {med['cluster']:.1f} "
          f"(cluster/fixed {med['cluster'] / med['fixed']:.2f})")
    return {"runs": runs, "median_mib_per_s": med}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--lease-ttl", type=int, default=1)
    parser.add_argument("--throughput", action="store_true",
                        help="instead: logd bench against a fixed leader and a cluster leader (--acks all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bench-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    result = trio.run(throughput if ns.throughput else main, ns)
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2))
