"""Fixtures: a real server on port 0 in the test's nursery (see harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from logd_trio.client.client import Client, open_client

from .harness import FAST_RETRY, LocalServer


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
