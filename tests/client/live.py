"""Servers and scripted peers for the client tests, on both anyio backends.

The server itself runs on Trio: under anyio's trio backend it runs in the
test's own event loop (so virtual time covers it), under asyncio in a thread
of its own with its own ``trio.run``.  Scripted peers are anyio listeners.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import queue
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

from logd_trio.server.app import serve
from logd_trio.server.config import ServerConfig

from ..harness import LocalServer, local_config


class LiveServer(Protocol):
    """A real logd-trio server that can be stopped and restarted on the same port and data."""

    @property
    def addr(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class InLoopServer(LocalServer):
    """The server as tasks of ``tg`` (the trio backend: the test's own loop)."""


class ThreadServer:
    """The server in a thread with its own ``trio.run`` (any backend; asyncio's tests)."""

    def __init__(self, workdir: Path, **options: Any) -> None:
        self.config = local_config(workdir, **options)
        self.port = 0
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._shutdown: trio.Event | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _main(self, config: ServerConfig, ready: queue.Queue[tuple[str, int] | BaseException]) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                ready.put(await nursery.start(functools.partial(serve, config, shutdown=self._shutdown)))

        try:
            trio.run(main)
        except BaseException as exc:  # reported to start(); the thread ends
            ready.put(exc)

    def start_blocking(self) -> None:
        config = dataclasses.replace(self.config, host=f"127.0.0.1:{self.port}")
        ready: queue.Queue[tuple[str, int] | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(config, ready), daemon=True)
        self._thread.start()
        got = ready.get(timeout=30)
        if isinstance(got, BaseException):
            raise got
        self.port = got[1]

    def stop_blocking(self) -> None:
        assert self._thread is not None and self._token is not None and self._shutdown is not None
        if not self._thread.is_alive():
            return  # stopped already
        trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the server thread did not stop"

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.start_blocking)

    async def stop(self) -> None:
        await anyio.to_thread.run_sync(self.stop_blocking)


def new_server(backend: str, tg: anyio.abc.TaskGroup, workdir: Path, **options: Any) -> LiveServer:
    """The right kind of server for ``backend`` (``anyio_backend_name``)."""
    return InLoopServer(tg, workdir, **options) if backend == "trio" else ThreadServer(workdir, **options)


# ---------------------------------------------------------------- scripted peers

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


async def scripted_peer(tg: anyio.abc.TaskGroup, handler: Handler) -> str:
    """A listener on port 0 of 127.0.0.1 whose connections run ``handler`` (a stand-in server).

    It stops with ``tg``; a handler's connection is closed when the handler returns.
    """
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        # the client going away is the client's business
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            async with stream:
                await handler(stream)

    tg.start_soon(listener.serve, handle)
    return f"127.0.0.1:{port}"


async def receive_some(stream: anyio.abc.ByteReceiveStream) -> bytes:
    """The next bytes, ``b""`` at the end of the stream."""
    try:
        return await stream.receive(65536)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        return b""


async def read_line(stream: anyio.abc.ByteReceiveStream, buf: bytearray) -> bytes | None:
    while b"\r\n" not in buf:
        data = await receive_some(stream)
        if not data:
            return None
        buf += data
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return line


async def read_body(stream: anyio.abc.ByteReceiveStream, buf: bytearray, size: int) -> None:
    """Drop ``size`` bytes of request body (``buf`` first)."""
    while len(buf) < size:
        data = await receive_some(stream)
        if not data:
            raise anyio.EndOfStream
        buf += data
    del buf[:size]


async def wait_all_tasks_blocked() -> None:
    """Let the other tasks run until they wait (Trio: exactly; asyncio: a few loop passes)."""
    if trio.lowlevel.in_trio_run():
        await trio.testing.wait_all_tasks_blocked()
    else:
        for _ in range(50):
            await anyio.lowlevel.checkpoint()


def virtual_time(threshold: float = 0.02) -> pytest.MarkDecorator:
    """Run the test on Trio only, with a clock that jumps after ``threshold`` s of real idleness
    (asyncio has no virtual time, and these tests must not sleep for real)."""
    return pytest.mark.parametrize(
        "anyio_backend",
        [pytest.param(("trio", {"clock": trio.testing.MockClock(autojump_threshold=threshold)}), id="trio-vtime")],
    )


def virtual_or_scaled(threshold: float = 0.02) -> pytest.MarkDecorator:
    """Trio with virtual time, and asyncio in real time: the test takes its timeouts from the
    ``unit`` fixture (1 s under virtual time, 0.1 s on asyncio) and checks elapsed times with
    :func:`elapsed_ok`."""
    return pytest.mark.parametrize(
        "anyio_backend",
        [pytest.param(("trio", {"clock": trio.testing.MockClock(autojump_threshold=threshold)}), id="trio-vtime"),
         pytest.param("asyncio", id="asyncio-real")],
    )


def virtual() -> bool:
    """Is the running loop on virtual time (Trio's MockClock)?"""
    return trio.lowlevel.in_trio_run() and isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


def elapsed_ok(elapsed: float, expected: float, abs_: float = 0.1) -> bool:
    """``expected`` (within ``abs_``) under virtual time; in real time at least ``expected``
    and not far beyond it (a loaded machine is slow, never early)."""
    if virtual():
        return abs(elapsed - expected) <= abs_
    return expected - 0.01 <= elapsed < expected + 2.0


trio_only = pytest.mark.parametrize("anyio_backend", ["trio"])
