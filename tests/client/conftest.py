"""Client tests run on both anyio backends (trio and asyncio); see live.py.

A test is put on both backends by ``pytestmark = pytest.mark.anyio`` in its
module.  pytest-trio's trio mode marks every async test for itself; for anyio
tests that mark is taken off again here, so anyio's plugin runs them (the
server tests keep pytest-trio).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
import trio.lowlevel
import trio.testing

from logd_trio.client.client import Client, open_client
from logd_trio.server.storage import syscalls

from ..harness import FAST_RETRY, DiskTakesNoVirtualTime
from .live import LiveServer, new_server, virtual


@pytest.fixture(scope="module", params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture(autouse=True)
def _disk_takes_no_virtual_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under a virtual clock (the ``trio-vtime`` runs), the in-process server's fsyncs take
    no virtual time, as with the server tests' ``vclock``: no timing depends on the disk."""
    backend = request.getfixturevalue("anyio_backend") if "anyio_backend" in request.fixturenames else None
    clock = backend[1].get("clock") if isinstance(backend, tuple) else None
    if isinstance(clock, trio.testing.MockClock):
        with syscalls.install(DiskTakesNoVirtualTime(clock)):
            yield
    else:
        yield


@pytest.fixture
async def unit() -> float:
    """Seconds per time unit of a timing test: 1 under virtual time, 0.1 in real time (asyncio)."""
    return 1.0 if virtual() else 0.1


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("anyio") is not None:
            item.own_markers = [m for m in item.own_markers if m.name != "trio"]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    # The loop is asked, not the anyio_backend fixture: pytest-trio tests use this fixture too.
    async with anyio.create_task_group() as tg:
        srv = new_server(("trio" if trio.lowlevel.in_trio_run() else "asyncio"), tg, tmp_path / "data")
        await srv.start()
        yield srv
        await srv.stop()


@pytest.fixture
async def client(server: LiveServer) -> AsyncIterator[Client]:
    async with open_client(server.addr, retry=FAST_RETRY) as c:
        yield c


@pytest.fixture
async def tg() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group for the test's helpers (peers, servers); cancelled when the test ends."""
    async with anyio.create_task_group() as group:
        yield group
        group.cancel_scope.cancel()
