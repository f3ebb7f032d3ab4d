"""Shared fixtures: a real server on port 0 in the test's nursery."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from logd_trio.client import Client, RetryPolicy, open_client
from logd_trio.config import ServerConfig
from logd_trio.server import serve

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``shared/`` beside the checkout (CI and developers both have it)."""
    env = os.environ.get("LOGD_SHARED_DIR")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared", REPO.parent.parent / "shared"]
    for c in candidates:
        if (c / "conformance" / "cases.json").exists():
            return c
    raise FileNotFoundError("shared/conformance not found beside the repository; set LOGD_SHARED_DIR")


CONFORMANCE = shared_dir() / "conformance"
if str(CONFORMANCE) not in sys.path:
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


class LocalServer:
    """A real logd-trio server in the test's nursery that can be stopped and restarted
    on the same port and data directory."""

    def __init__(self, nursery: trio.Nursery, workdir: Path, **options: Any) -> None:
        self.nursery = nursery
        self.config = ServerConfig(host="127.0.0.1:0", workdir=workdir, fsync="never", **options)
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


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[LocalServer]:
    srv = LocalServer(nursery, tmp_path / "data")
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def client(server: LocalServer) -> AsyncIterator[Client]:
    async with open_client(server.addr, retry=FAST_RETRY) as c:
        yield c




@pytest.fixture
def vclock() -> trio.testing.MockClock:
    """Virtual time for timeout tests.  It jumps only after 50 ms of real
    idleness (pytest-trio's autojump_clock jumps at once), so that work the
    server does in worker threads (topic creation, fsync) completes before
    virtual time moves on."""
    return trio.testing.MockClock(autojump_threshold=0.05)
