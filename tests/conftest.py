"""Shared fixtures: a real server on port 0 in the test's nursery."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

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


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningServer]:
    srv = await start_server(nursery, make_config(tmp_path / "data"))
    yield srv
    srv.scope.cancel()


@pytest.fixture
def vclock() -> trio.testing.MockClock:
    """Virtual time for timeout tests.  It jumps only after 50 ms of real
    idleness (pytest-trio's autojump_clock jumps at once), so that work the
    server does in worker threads (topic creation, fsync) completes before
    virtual time moves on."""
    return trio.testing.MockClock(autojump_threshold=0.05)
