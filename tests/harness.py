"""The one server harness of the test suite: servers in the test's nursery (port 0),
server processes, and scripted peers that stand in for other servers."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio.abc
import trio
import trio.testing

from logd_trio.client.client import RetryPolicy
from logd_trio.server.app import serve
from logd_trio.server.config import ServerConfig
from logd_trio.server.storage import syscalls

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """``shared/`` beside the checkout (CI and developers both have it)."""
    env = os.environ.get("LOGD_SHARED_DIR")
    # LOGD_SHARED_DIR, when set, is the only place looked at (CI sets it to "none" for
    # its run without shared/); otherwise shared/ beside the checkout.
    candidates = [Path(env)] if env is not None else [REPO.parent / "shared", REPO.parent.parent / "shared"]
    for c in candidates:
        if (c / "conformance" / "cases.json").exists():
            return c
    return None


_SHARED = shared_dir()
# None when shared/ is absent: the conformance tests then skip, everything else runs.
CONFORMANCE: Path | None = _SHARED / "conformance" if _SHARED is not None else None
if CONFORMANCE is not None and str(CONFORMANCE) not in sys.path:
    sys.path.insert(0, str(CONFORMANCE))


@dataclass
class RunningServer:
    host: str
    port: int
    config: ServerConfig
    scope: trio.CancelScope
    shutdown: trio.Event
    stopped: trio.Event

    async def stop(self) -> None:
        """Graceful shutdown, as on SIGTERM; returns once serve() has returned."""
        self.shutdown.set()
        await self.stopped.wait()

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


async def start_server(nursery: trio.Nursery, config: ServerConfig) -> RunningServer:
    scope = trio.CancelScope()
    shutdown = trio.Event()
    stopped = trio.Event()

    async def runner(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await serve(config, shutdown=shutdown, task_status=task_status)
        finally:
            stopped.set()

    host, port = await nursery.start(runner)
    return RunningServer(host, port, config, scope, shutdown, stopped)


def make_config(workdir: Path, **kw: Any) -> ServerConfig:
    base = ServerConfig(host="127.0.0.1:0", workdir=workdir)
    return replace(base, **kw)


FAST_RETRY = RetryPolicy(attempts=2, initial=0.01, maximum=0.01)


def local_config(workdir: Path, **options: Any) -> ServerConfig:
    """The in-process test server's configuration: a free loopback port, no fsync unless asked."""
    return ServerConfig(**{"host": "127.0.0.1:0", "workdir": workdir, "fsync": "never", **options})


class LocalServer:
    """A real logd-trio server in the test's nursery that can be stopped and restarted
    on the same port and data directory."""

    def __init__(self, nursery: trio.Nursery | anyio.abc.TaskGroup, workdir: Path, **options: Any) -> None:
        self.nursery = nursery  # an anyio task group works too (the client tests, trio backend)
        self.config = local_config(workdir, **options)
        self.host = "127.0.0.1"
        self.port = 0
        self._shutdown: trio.Event | None = None
        self._done: trio.Event | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        config = dataclasses.replace(self.config, host=f"127.0.0.1:{self.port}")
        shutdown, done = trio.Event(), trio.Event()
        self._shutdown, self._done = shutdown, done

        async def runner(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await serve(config, shutdown=shutdown, task_status=task_status)
            finally:
                done.set()

        self.host, self.port = await self.nursery.start(runner)

    async def stop(self) -> None:
        assert self._shutdown is not None and self._done is not None
        self._shutdown.set()
        await self._done.wait()


# ---------------------------------------------------------------- slow disk

# parse_delay and SlowDisk live beside the seam: a spawned server installs the same layer
# when SLOW_DISK_ENV is set (see spawn).
parse_delay = syscalls.parse_delay
SlowDisk = syscalls.SlowDisk
# The --slow-disk delay of this run ("" for none); conftest sets it, spawn passes it on.
SLOW_DISK = ""


class DiskTakesNoVirtualTime(syscalls.Layer):
    """While the server's storage work runs in a worker thread, ``clock`` does not autojump:
    real disk work takes no virtual time, however slow the disk.

    Without it, a virtual-time test whose server fsyncs (creating a topic, shutting down)
    sees the clock jump to the next deadline whenever an fsync outlasts the autojump
    threshold, so its timing depends on the disk.  The server tells the layer of each
    hand-off on the Trio thread before the thread starts (``run_blocking``), so even a
    threshold of 0 cannot jump in the gap between the hand-off and the thread's first call."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        super().__init__()
        self.clock = clock
        self.threshold = clock.autojump_threshold
        self.busy = 0  # changed on the Trio thread only

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        if self.busy == 0:  # what a test set meanwhile (e.g. inf around a restart) is kept
            self.threshold = self.clock.autojump_threshold
        self.busy += 1
        self.clock.autojump_threshold = math.inf
        try:
            with self.inner.blocking():
                yield
        finally:
            self.busy -= 1
            if self.busy == 0:
                self.clock.autojump_threshold = self.threshold

    def blocking(self) -> contextlib.AbstractContextManager[None]:
        return self._paused()


# ---------------------------------------------------------------- server processes

LISTENING = re.compile(rb"listening on ([0-9.]+):(\d+)")


class ServerProcess:
    def __init__(self, proc: trio.Process, host: str, port: int, log: bytearray) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.log = log


def with_ulimit(ulimit: str, cmd: list[str]) -> list[str]:
    """``cmd`` run after ``ulimit <ulimit>`` (e.g. ``-n 200``) in a shell: limits set between fork
    and exec without a preexec_fn, which is not safe in a process with threads."""
    return ["sh", "-c", f'ulimit {ulimit} && exec "$0" "$@"', *cmd]


async def spawn(nursery: trio.Nursery, workdir: Path, *args: str, ulimit: str | None = None) -> ServerProcess:
    cmd = [sys.executable, "-m", "logd_trio_cli.main", "serve", "--host", "127.0.0.1:0",
           "--workdir", str(workdir), *args]
    if ulimit is not None:
        cmd = with_ulimit(ulimit, cmd)
    env = dict(os.environ)
    env.pop(syscalls.SLOW_DISK_ENV, None)
    if SLOW_DISK:  # the run's --slow-disk reaches the server process too
        env[syscalls.SLOW_DISK_ENV] = SLOW_DISK
    proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert proc.stderr is not None
    log = bytearray()
    found = trio.Event()
    addr: list[tuple[str, int]] = []

    async def pump() -> None:
        assert proc.stderr is not None
        try:
            async for chunk in proc.stderr:
                log.extend(chunk)
                m = LISTENING.search(log)
                if m and not found.is_set():
                    addr.append((m.group(1).decode(), int(m.group(2))))
                    found.set()
            await trio.sleep_forever()  # keep the process owned until the test ends
        finally:
            if proc.returncode is None:  # the test ended (or failed) with the server still up
                proc.kill()

    nursery.start_soon(pump)
    with trio.fail_after(20):
        await found.wait()
    return ServerProcess(proc, addr[0][0], addr[0][1], log)


# ---------------------------------------------------------------- scripted peers

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def scripted_peer(nursery: trio.Nursery, handler: Handler) -> str:
    """A listener on port 0 whose connections run ``handler`` (a stand-in for another server)."""
    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"127.0.0.1:{port}"


async def read_line(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    while b"\r\n" not in buf:
        data = await stream.receive_some(4096)
        if not data:
            return None
        buf += data
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return line
