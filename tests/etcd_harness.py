"""Real etcd clusters for tests: 1 or 3 members on free loopback ports, data in a
temp dir, fast raft timings, killed by pid when the test ends (also when it fails,
and also if the test process itself dies: the members get SIGKILL with it)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from .tlsfiles import Certs

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# Fast raft for tests: the minimum lease TTL is 1.5 x the election timeout (0.375 s here).
HEARTBEAT_MS = 25
ELECTION_MS = 250
PR_SET_PDEATHSIG = 1


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel just handed out (port 0), released for etcd to bind."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # The signal comes when the thread that started the member exits: start members
    # from the main thread (fixtures and Trio tests do), never from a worker thread.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class EtcdMember:
    def __init__(self, name: str, data_dir: Path, client_port: int, peer_port: int,
                 tls: Certs | None = None) -> None:
        self.tls = tls  # clients speak https and must present a certificate of tls.ca (peers stay http)
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{name}.log"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, token: str, state: str = "new") -> None:
        cmd = [ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
               "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
               "--initial-cluster-token", token,
               "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
               "--log-level", "warn"]
        if self.tls is not None:
            cmd += ["--cert-file", self.tls.server.cert, "--key-file", self.tls.server.key,
                    "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         preexec_fn=_die_with_parent)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL by pid (SIGTERM can take seconds) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def _context(self) -> ssl.SSLContext | None:
        return self.tls.context(self.tls.client) if self.tls is not None else None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5, context=self._context()) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def status(self) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=1, context=self._context()) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


class EtcdCluster:
    def __init__(self, root: Path, size: int, tls: Certs | None = None) -> None:
        self.root = root
        ports = free_ports(2 * size)
        self.token = f"t-{os.getpid()}-{ports[0]}"
        self.members = [EtcdMember(f"n{i}", root / f"n{i}", ports[2 * i], ports[2 * i + 1], tls)
                        for i in range(size)]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self) -> None:
        for m in self.members:
            m.start(self.initial_cluster, self.token)

    def wait_healthy(self, timeout: float = 5.0) -> None:
        """Poll every member's /health (a real process starting: a short real poll)."""
        deadline = time.monotonic() + timeout
        pending = [m for m in self.members if m.alive]
        while pending:
            for m in pending:
                if not m.alive:
                    raise RuntimeError(f"etcd {m.name} exited at start:\n{m.log_tail()}")
            pending = [m for m in pending if not m.healthy()]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"etcd {pending[0].name} not healthy within {timeout}s:\n{pending[0].log_tail()}")
            if pending:
                time.sleep(0.02)

    def restart(self, member: EtcdMember) -> None:
        """Start a killed member again on its data directory and ports (then wait_healthy;
        from a Trio test: ``await trio.to_thread.run_sync(cluster.wait_healthy)``)."""
        member.kill()
        member.start(self.initial_cluster, self.token)

    def leader(self) -> EtcdMember:
        """The member that is etcd's raft leader now."""
        for m in self.members:
            if m.alive:
                s = m.status()
                if s.get("leader") == s.get("header", {}).get("member_id"):
                    return m
        raise RuntimeError("no etcd leader")

    def kill_all(self) -> None:
        for m in self.members:
            with contextlib.suppress(OSError):
                m.resume()  # a paused member must not outlive the test either
            m.kill()


@contextlib.contextmanager
def etcd_cluster(root: Path, size: int = 1, tls: Certs | None = None) -> Iterator[EtcdCluster]:
    """A healthy cluster of ``size`` members (``tls``: clients over https with certificates of
    ``tls.ca``, a client certificate required); every member killed on exit."""
    if not os.path.exists(ETCD):
        raise RuntimeError("etcd not found: install it (Debian: apt-get install -y etcd-server)")
    last: Exception | None = None
    for attempt in range(3):  # a port taken between free_ports() and etcd's bind: try new ones
        cluster = EtcdCluster(root / f"etcd{attempt}", size, tls)
        try:
            cluster.start()
            cluster.wait_healthy()
        except RuntimeError as e:
            cluster.kill_all()
            last = e
            continue
        try:
            yield cluster
        finally:
            cluster.kill_all()
        return
    raise RuntimeError(f"could not start etcd: {last}")


class TcpProxy:
    """A loopback TCP proxy to one etcd member that can be frozen: while frozen it
    accepts and reads but forwards nothing either way (a network partition that
    keeps connections open); thawed, it delivers what it held."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.frozen = False
        self._thawed = trio.Event()
        self._thawed.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]

    def freeze(self) -> None:
        self.frozen = True
        self._thawed = trio.Event()

    def thaw(self) -> None:
        self.frozen = False
        self._thawed.set()

    async def _handle(self, downstream: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await downstream.aclose()
            return
        async with downstream, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, downstream, upstream, nursery.cancel_scope, 1.0)
            nursery.start_soon(self._pump, upstream, downstream, nursery.cancel_scope, 0.0)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope,
                    linger: float) -> None:
        """Forward until EOF; then close both ways, after ``linger`` seconds (a client
        that gave up: what it sent is still processed, as when its FIN is lost)."""
        try:
            while data := await src.receive_some(65536):
                while self.frozen:
                    await self._thawed.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.sleep(linger)
        scope.cancel()
