"""Fixtures: a real server on port 0 in the test's nursery (see harness.py), virtual clocks,
the storage layer's syscall seam, and the ``--slow-disk`` option."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

from logd_trio.client.client import Client, open_client
from logd_trio.server.storage import syscalls

from . import harness
from .harness import FAST_RETRY, DiskTakesNoVirtualTime, LocalServer, SlowDisk, parse_delay

L = TypeVar("L", bound=syscalls.Layer)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow-disk", default="", metavar="DELAY",
        help="delay every fsync/fdatasync the storage layer makes by DELAY (e.g. 60ms, 0.2s), "
             "for the whole run: tests must not depend on disk speed",
    )


_slow_disk: contextlib.ExitStack | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _slow_disk
    value = str(config.getoption("--slow-disk") or "")
    if value:
        try:
            delay = parse_delay(value)
        except ValueError as e:
            raise pytest.UsageError(f"--slow-disk: {e}") from None
        harness.SLOW_DISK = value  # for the server processes the tests spawn
        _slow_disk = contextlib.ExitStack()
        _slow_disk.enter_context(syscalls.install(SlowDisk(delay)))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _slow_disk is not None:
        _slow_disk.close()


def pytest_report_header(config: pytest.Config) -> str | None:
    value = config.getoption("--slow-disk")
    return f"slow disk: every storage fsync/fdatasync delayed by {value}" if value else None


@pytest.fixture
def syscall_layer() -> Iterator[Callable[[L], L]]:
    """``syscall_layer(layer)`` installs a :class:`syscalls.Layer` over the storage layer's
    system calls until the test ends (fault injection without patching ``os``)."""
    with contextlib.ExitStack() as stack:

        def install(layer: L) -> L:
            return stack.enter_context(syscalls.install(layer))

        yield install


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
def vclock() -> Iterator[trio.testing.MockClock]:
    """Virtual time for timeout tests.  It jumps after 50 ms of real idleness
    (pytest-trio's autojump_clock jumps at once), so that short work the server
    does in worker threads completes before virtual time moves on, and never
    while a storage fsync runs: disk work takes no virtual time, so no test's
    timing depends on the disk (see ``--slow-disk``)."""
    clock = trio.testing.MockClock(autojump_threshold=0.05)
    with syscalls.install(DiskTakesNoVirtualTime(clock)):
        yield clock
