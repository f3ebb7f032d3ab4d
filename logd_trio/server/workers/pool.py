"""The owner's side of ``--workers N``: the worker processes, their relay socket and the head table.

:class:`WorkerPool` (one per server, started by :func:`logd_trio.server.app.serve` once
its listeners are bound) creates a private directory holding the head table
(:mod:`.heads`, kept by :class:`~.publish.Publisher`) and the Unix socket the
workers relay requests over; each relayed client connection is served by the
owner's ordinary connection code (``admit_relayed``).  It starts N-1 processes
(``sys.executable -m logd_trio.server.workers.worker``), waits until each says
it listens, and restarts one that exits, after a back-off (``RESTART_MIN``
doubling to ``RESTART_MAX``; reset once a worker has lived ``STABLE``
seconds).  :meth:`WorkerPool.stop` sends SIGTERM to every worker, waits at most
the shutdown timeout plus ``KILL_AFTER``, then kills what is left; a cancelled
pool kills its workers too.  Every process it starts it stops.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final, Protocol

import trio

from logd_trio.server.logs import JsonFormatter
from logd_trio.server.registry import Registry
from logd_trio.server.workers.publish import Publisher
from logd_trio.server.workers.session import PREAMBLE_SIZE
from logd_trio.server.workers.sockets import config_to_json, dumps

__all__ = ["WorkerPool"]

log = logging.getLogger("logd_trio.server.workers")

READY_TIMEOUT: Final = 30.0  # a worker's start (imports, bind) on a loaded machine
PREAMBLE_TIMEOUT: Final = 5.0
RESTART_MIN: Final = 0.1
RESTART_MAX: Final = 5.0
STABLE: Final = 10.0
KILL_AFTER: Final = 2.0


class RelayAdmitter(Protocol):
    """What the pool needs of the owner's listener."""

    def admit_relayed(self, sock: trio.socket.SocketType, address: str, handlers: trio.Nursery) -> None: ...


def _log_spec() -> tuple[str, bool]:
    root = logging.getLogger()
    fmt = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"
    return fmt, logging.getLogger("logd_trio").isEnabledFor(logging.DEBUG)


def _remove_leftovers(tmp: Path) -> None:
    """Remove the private directories of owners that died without removing theirs (SIGKILL);
    the owner's pid is in the name, and a directory whose owner runs is left alone."""
    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(r"logd-workers-(\d+)-\w+", name)
        if m is None or _runs(int(m.group(1))):
            continue
        log.info("removing %s, left by a server that is gone", tmp / name)
        shutil.rmtree(tmp / name, ignore_errors=True)


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's; (not a pid: never removed)
        return True
    return True


class WorkerPool:
    """N-1 worker processes beside the owner; see the module docstring."""

    def __init__(self, registry: Registry, listener: RelayAdmitter) -> None:
        self.registry = registry
        self.config = registry.config
        self.listener = listener
        self.count = self.config.workers - 1
        _remove_leftovers(Path(tempfile.gettempdir()))
        self._dir = Path(tempfile.mkdtemp(prefix=f"logd-workers-{os.getpid()}-"))
        self.upstream_path = str(self._dir / "relay")
        self.publisher = Publisher(registry, self._dir / "heads")
        self._procs: list[trio.Process | None] = [None] * self.count
        self._stopping = False
        self._done = trio.Event()

    async def run(self, port: int, handlers: trio.Nursery,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until :meth:`stop` (or cancelled): relay socket, publisher, workers."""
        relay = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await relay.bind(self.upstream_path)
            relay.listen(1024)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_relays, relay, handlers)
                self.publisher.attach_all()
                nursery.start_soon(self.publisher.run)
                for i in range(self.count):
                    await nursery.start(self._supervise, i, port)
                log.info("%d worker processes serve reads on port %d", self.count, port)
                task_status.started()
                await self._done.wait()
                nursery.cancel_scope.cancel()
        finally:
            relay.close()
            with trio.CancelScope(shield=True):
                for proc in self._procs:
                    if proc is not None and proc.returncode is None:
                        proc.kill()
                        await proc.wait()
            self.publisher.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    async def stop(self) -> None:
        """SIGTERM every worker, wait (bounded), kill what is left; then :meth:`run` returns."""
        self._stopping = True
        procs = [p for p in self._procs if p is not None and p.returncode is None]
        for proc in procs:
            proc.terminate()
        with trio.move_on_after(self.config.shutdown_timeout + KILL_AFTER):
            for proc in procs:
                await proc.wait()
        for proc in procs:
            if proc.returncode is None:
                log.warning("worker pid %d did not stop in time: killing it", proc.pid)
                proc.kill()
                await proc.wait()
        self._done.set()

    async def _supervise(self, i: int, port: int, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        backoff = RESTART_MIN
        started = False
        while not self._stopping:
            t0 = trio.current_time()
            try:
                await self._run_one(i, port, task_status if not started else None)
            finally:
                self._procs[i] = None
            started = True
            if self._stopping:
                return
            if trio.current_time() - t0 >= STABLE:
                backoff = RESTART_MIN
            log.warning("worker %d: restarting in %gs", i, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_MAX)

    async def _run_one(self, i: int, port: int, task_status: trio.TaskStatus[None] | None) -> None:
        fmt, verbose = _log_spec()
        spec = {"config": config_to_json(self.config), "heads": str(self.publisher.table.path),
                "upstream": self.upstream_path, "port": port, "index": i, "log_format": fmt, "verbose": verbose}
        proc = await trio.lowlevel.open_process([sys.executable, "-m", "logd_trio.server.workers.worker"],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._procs[i] = proc
        try:
            assert proc.stdin is not None and proc.stdout is not None
            await proc.stdin.send_all(dumps(spec))  # stdin stays open: its EOF tells the worker we are gone
            ready = b""
            with trio.move_on_after(READY_TIMEOUT):
                while b"\n" not in ready:
                    chunk = await proc.stdout.receive_some(256)
                    if not chunk:
                        break
                    ready += chunk
            if not ready.startswith(b"ready "):
                log.error("worker %d did not start (%s)", i, "exited" if proc.returncode is not None else
                          f"no answer within {READY_TIMEOUT:g}s")
                if task_status is not None:
                    task_status.started()
                return
            if task_status is not None:
                task_status.started()
            code = await proc.wait()
            if not self._stopping:
                log.error("worker %d (pid %d) exited with %s", i, proc.pid,
                          f"signal {-code}" if code < 0 else f"status {code}")
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    await pipe.aclose()

    async def _accept_relays(self, relay: trio.socket.SocketType, handlers: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = await relay.accept()
            except OSError as e:
                log.warning("relay socket: accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            handlers.start_soon(self._admit, sock, handlers)

    async def _admit(self, sock: trio.socket.SocketType, handlers: trio.Nursery) -> None:
        """Read the worker's preamble (its client's address), then serve the connection as any other."""
        got = b""
        try:
            with trio.fail_after(PREAMBLE_TIMEOUT):
                while len(got) < PREAMBLE_SIZE:
                    chunk = await sock.recv(PREAMBLE_SIZE - len(got))
                    if not chunk:
                        raise EOFError
                    got += chunk
        except (OSError, EOFError, trio.TooSlowError):
            sock.close()
            return
        self.listener.admit_relayed(sock, got.decode("ascii", "replace").strip(), handlers)
