"""Real PostgreSQL and Redis servers for the state-handler tests.

Each server runs from a fresh temporary directory on a free loopback port, is
started and stopped by pid (never by name), and can be stopped, restarted on the
same port and data, or paused (SIGSTOP: alive but silent) to test a consumer
whose database goes away under it.  PostgreSQL refuses to run as root, so as
root the cluster is created and run as the unprivileged user ``nobody``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import redis

START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def postgres_bin() -> Path:
    """The directory of initdb/postgres: $LOGD_PG_BIN, the newest /usr/lib/postgresql/*/bin, or PATH."""
    env = os.environ.get("LOGD_PG_BIN")
    if env:
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("PostgreSQL binaries not found: install postgresql (.ci/run does) or set LOGD_PG_BIN")


def _wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT} s:\n{log.read_text(errors='replace')[-2000:]}")


def _same_dir(reported: str, ours: Path) -> bool:
    return os.path.realpath(reported) == os.path.realpath(ours)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _tree(root: int) -> list[int]:
    """The process and all its descendants (PostgreSQL backends are in sessions of their own,
    so a process group does not hold them)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parents.setdefault(st[1], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    for pid in pids:
        while (st := _stat(pid)) is not None and st[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
    _signal([p for p in pids if (st := _stat(p)) is not None and st[0] != "Z"], signal.SIGKILL)


class _Server:
    """A database process and the processes it starts, owned by this object."""

    what = "server"
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        # As root the server runs as nobody, who must reach the directory: /tmp is open to all
        # (TMPDIR may not be).
        root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix=f"logd-{self.what}-", dir="/tmp" if root else None))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self._user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def _popen(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.dir, start_new_session=True, **self._user)

    def _ready(self) -> bool:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start (or restart, on the same port and data).  The first start moves to another free
        port if the chosen one was taken meanwhile."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.what} already running"
        first = self.proc is None
        log = self.dir / "server.log"
        for attempt in range(3):
            self.proc = self._popen(self._command(), log)
            try:
                _wait_ready(self.proc, self._ready, log, self.what)
                return
            except RuntimeError:
                self.kill()
                if not first or attempt == 2 or "already in use" not in log.read_text(errors="replace"):
                    raise
                self.port = free_port()
            except BaseException:
                self.kill()
                raise

    def stop(self, sig: int | None = None) -> None:
        """Stop the server (its normal shutdown signal by default) and wait for all its processes."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.resume()
        tree = _tree(proc.pid)
        os.kill(proc.pid, self.stop_signal if sig is None else sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        _wait_gone(tree)

    def kill(self) -> None:
        """SIGKILL the server and every process it started."""
        proc = self.proc
        if proc is None:
            return
        tree = _tree(proc.pid)
        _signal(tree, signal.SIGKILL)
        proc.wait()
        _wait_gone(tree)

    def crash(self) -> None:
        """Stop the server as a crash would (no clean shutdown)."""
        self.kill()

    def pause(self) -> None:
        """SIGSTOP every process of the server: connections stay open, nothing answers."""
        assert self.proc is not None
        _signal(_tree(self.proc.pid), signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _signal(_tree(self.proc.pid), signal.SIGCONT)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer(_Server):
    what = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown: SIGTERM would wait for the clients to disconnect

    def __init__(self) -> None:
        super().__init__()
        self.data = self.dir / "data"
        log = self.dir / "initdb.log"
        proc: subprocess.Popen[bytes] | None = None
        try:  # the fixtures' cleanup does not cover the constructor: clean up here
            self.bin = postgres_bin()
            proc = self._popen([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                "-E", "UTF8", "--no-locale", "--no-sync"], log)
            if proc.wait(timeout=120) != 0:
                raise RuntimeError(f"initdb failed:\n{log.read_text(errors='replace')[-2000:]}")
        except BaseException:
            if proc is not None and proc.poll() is None:
                tree = _tree(proc.pid)
                _signal(tree, signal.SIGKILL)
                proc.wait()
                _wait_gone(tree)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _command(self) -> list[str]:
        # fsync=off: the tests restart the server, never the machine.
        return [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
                "-k", str(self.dir), "-c", "fsync=off", "-c", "max_connections=60",
                "-c", "shared_buffers=16MB"]

    def _ready(self) -> bool:
        # The port may have been taken by another server meanwhile: only ours counts as ready.
        try:
            with psycopg.connect(self.conninfo, connect_timeout=2) as conn:
                row = conn.execute("SHOW data_directory").fetchone()
        except psycopg.Error:
            return False
        return row is not None and _same_dir(str(row[0]), self.data)

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT): no checkpoint, WAL recovery on the next start, like a crash."""
        self.stop(signal.SIGQUIT)


class RedisServer(_Server):
    """``persistent``: append-only file fsynced on every write, so a restart keeps the data."""

    what = "redis"

    def __init__(self, *, persistent: bool = False) -> None:
        super().__init__()
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: apt-get install -y redis-server (.ci/run does)")
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        return [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir),
                "--daemonize", "no", *persist]

    def _ready(self) -> bool:
        # The port may have been taken by another server meanwhile: only ours counts as ready.
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=1) as r:
                config = {(k.decode() if isinstance(k, bytes) else k): v for k, v in r.config_get("dir").items()}
        except redis.RedisError:
            return False
        found = config.get("dir")
        if isinstance(found, bytes):
            found = found.decode(errors="replace")
        return isinstance(found, str) and _same_dir(found, self.dir)
