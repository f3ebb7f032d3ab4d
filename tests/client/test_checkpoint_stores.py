"""PostgresCheckpoint and RedisCheckpoint against real servers (tests/dbs_harness.py).

Each store-level test runs the same coroutine under Trio and under asyncio
(``anyio.run``); the end-to-end tests run a real logd server and a Scanner on
Trio.  The databases of most tests are started once per session; the tests
that stop, crash or pause a database get one of their own.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import psycopg
import pytest
import redis
import trio

from logd_trio.client import checkpoint_redis
from logd_trio.client._checkpoint_store import MAX_STUCK
from logd_trio.client.checkpoint import Checkpoint, Position
from logd_trio.client.checkpoint_postgres import CheckpointUnavailable, PostgresCheckpoint
from logd_trio.client.checkpoint_redis import RedisCheckpoint
from logd_trio.client.client import Client
from logd_trio.core.errors import CheckpointError
from logd_trio.core.replies import Message

from ..dbs_harness import PostgresServer, RedisServer

Store = PostgresCheckpoint | RedisCheckpoint
Factory = Callable[..., Store]

BACKENDS = ["trio", "asyncio"]
KINDS = ["postgres", "redis"]


S = TypeVar("S", PostgresServer, RedisServer)


def _running(srv: S) -> Iterator[S]:
    """``srv`` started for the fixture's scope and stopped after it, however the tests end."""
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    yield from _running(PostgresServer())


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from _running(RedisServer())


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    yield from _running(PostgresServer())


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    yield from _running(RedisServer(persistent=True))  # a restart must keep the positions


def factory(kind: str, srv: PostgresServer | RedisServer) -> Factory:
    def make(consumer: str, **kw: Any) -> Store:
        if kind == "postgres":
            assert isinstance(srv, PostgresServer)
            return PostgresCheckpoint(srv.conninfo, consumer=consumer, **kw)
        assert isinstance(srv, RedisServer)
        return RedisCheckpoint(srv.url, consumer=consumer, **kw)

    return make


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(kind: str, request: pytest.FixtureRequest) -> Factory:
    """A store factory on the session's database of this kind."""
    srv = request.getfixturevalue("pg_server" if kind == "postgres" else "redis_server")
    return factory(kind, srv)


@pytest.fixture
def name() -> str:
    """A consumer name no other test uses (the session's databases are shared)."""
    return f"c-{uuid.uuid4().hex[:12]}"


def run(backend: str, fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend=backend)


# ---------------------------------------------------------------- the store on its own


@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_load_round_trip(make: Factory, name: str, backend: str) -> None:
    async def main() -> None:
        async with make(name) as cp:
            assert isinstance(cp, Checkpoint)
            assert await cp.load("orders") is None
            await cp.commit("orders", Position(0, 12))
            assert await cp.load("orders") == Position(0, 12)
            await cp.commit("orders", Position(4096, 0))
            assert await cp.load("orders") == Position(4096, 0)
            await cp.commit("orders", Position(4096, 0))  # the same again: no change, no error
            await cp.commit("orders", Position(100, 7))  # lower: ignored
            assert await cp.load("orders") == Position(4096, 0)
            assert await cp.load("other") is None  # each topic has its own position
            await cp.reset("orders", Position(5, 1))  # reset moves backwards on purpose
            assert await cp.load("orders") == Position(5, 1)
            await cp.reset("orders")
            assert await cp.load("orders") is None

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_beyond_double_precision_compare_exactly(make: Factory, name: str, backend: str) -> None:
    # 2**62 and 2**62 + 1 are the same double: a numeric compare in Lua would take the lower one.
    async def main() -> None:
        async with make(name) as cp:
            await cp.commit("t", Position(2**62 + 1, 0))
            await cp.commit("t", Position(2**62, 5))
            assert await cp.load("t") == Position(2**62 + 1, 0)
            await cp.commit("t", Position(2**63 - 1, 2**63 - 1))
            assert await cp.load("t") == Position(2**63 - 1, 2**63 - 1)

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_offset_compares_the_delta(make: Factory, name: str, backend: str) -> None:
    async def main() -> None:
        async with make(name) as cp:
            await cp.commit("t", Position(4096, 0))
            await cp.commit("t", Position(4096, 3))
            assert await cp.load("t") == Position(4096, 3)
            await cp.commit("t", Position(4096, 1))  # same offset, lower delta: ignored
            assert await cp.load("t") == Position(4096, 3)
            await cp.commit("t", Position(4097, 0))  # a higher offset wins over any delta
            assert await cp.load("t") == Position(4097, 0)

    run(backend, main)


def test_restarted_consumer_resumes_on_the_other_loop(make: Factory, name: str) -> None:
    async def first() -> None:
        async with make(name) as cp:
            await cp.commit("t", Position(300, 4))

    async def second() -> None:
        async with make(name) as cp:  # a new process would do exactly this
            assert await cp.load("t") == Position(300, 4)

    run("trio", first)
    run("asyncio", second)


def test_store_made_outside_the_loop_and_unicode_names(make: Factory, name: str) -> None:
    for backend in BACKENDS:
        cp = make(f"{name}-zähler·{backend}")  # printable, not ASCII; created before the loop runs

        async def main(cp: Store = cp) -> None:
            async with cp:
                await cp.commit("t", Position(8, 1))
                assert await cp.load("t") == Position(8, 1)

        run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_consumers_are_independent(make: Factory, name: str, backend: str) -> None:
    async def main() -> None:
        async with make(name + "-a") as a, make(name + "-b") as b:
            await a.commit("t", Position(900, 0))
            assert await b.load("t") is None
            await b.commit("t", Position(10, 0))  # lower than a's: b's own row/key, so it is stored
            assert await b.load("t") == Position(10, 0)
            assert await a.load("t") == Position(900, 0)
            await a.reset("t")
            assert await b.load("t") == Position(10, 0)

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_commits_never_move_backwards(make: Factory, name: str, backend: str) -> None:
    positions = [Position(off, d) for off in range(0, 4000, 97) for d in (0, 5, 11)]
    random.Random(7).shuffle(positions)
    seen: list[Position] = []

    async def main() -> None:
        stores = [make(name) for _ in range(4)]  # four connections for one consumer
        try:
            async with anyio.create_task_group() as tg:
                for i, pos in enumerate(positions):
                    tg.start_soon(committer, stores[i % len(stores)], pos)
                tg.start_soon(watcher, stores[0])
            assert await stores[1].load("t") == max(positions)
        finally:
            for s in stores:
                await s.aclose()

    async def committer(cp: Store, pos: Position) -> None:
        await cp.commit("t", pos)
        loaded = await cp.load("t")
        assert loaded is not None and loaded >= pos  # once committed, never below it

    async def watcher(cp: Store) -> None:
        for _ in range(30):
            pos = await cp.load("t")
            if pos is not None:
                seen.append(pos)
            await anyio.lowlevel.checkpoint()

    run(backend, main)
    assert seen == sorted(seen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_store_and_bad_arguments(make: Factory, name: str, kind: str, backend: str) -> None:
    for bad in ("", "a b", "x" * 201, "tab\there"):
        with pytest.raises(ValueError, match="consumer name"):
            make(bad)
    with pytest.raises(ValueError, match="timeout"):
        make(name, timeout=0)

    async def main() -> None:
        cp = make(name)
        with pytest.raises(ValueError, match="offset"):
            await cp.commit("t", Position(-1, 0))
        with pytest.raises(ValueError, match="delta"):
            await cp.commit("t", Position(0, 2**63))
        with pytest.raises(ValueError, match="topic"):
            await cp.load("")
        await cp.aclose()
        with pytest.raises(CheckpointError, match="closed"):
            await cp.load("t")

    run(backend, main)
    if kind == "postgres":
        with pytest.raises(ValueError, match="conninfo"):
            PostgresCheckpoint("dbname='app", consumer=name)  # unterminated quote
        with pytest.raises(ValueError, match="table"):
            PostgresCheckpoint("", consumer=name, table="drop table x;")
    else:
        with pytest.raises(ValueError, match="Redis URL"):
            RedisCheckpoint("http://127.0.0.1:1", consumer=name)


# ---------------------------------------------------------------- the documented layouts


def test_postgres_schema_and_rows(pg_server: PostgresServer, name: str) -> None:
    table = f"cp_{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        manual = PostgresCheckpoint(pg_server.conninfo, consumer=name, table=table, create_schema=False)
        with pytest.raises(CheckpointError, match="does not exist: call ensure_schema"):
            await manual.commit("t", Position(1, 0))
        # several consumers creating the table at once all succeed
        autos = [PostgresCheckpoint(pg_server.conninfo, consumer=f"{name}-{i}", table=table) for i in range(4)]
        async with anyio.create_task_group() as tg:
            for i, cp in enumerate(autos):
                tg.start_soon(cp.commit, "t", Position(i, 0))
        await manual.ensure_schema()  # idempotent
        await manual.commit("t", Position(64, 9))
        for cp in [manual, *autos]:
            await cp.aclose()

    run("trio", main)
    with psycopg.connect(pg_server.conninfo) as conn:
        cols = conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                            "WHERE table_name = %s ORDER BY ordinal_position", (table,)).fetchall()
        assert cols == [("consumer", "text"), ("topic", "text"), ("batch_offset", "bigint"),
                        ("delta", "bigint"), ("updated_at", "timestamp with time zone")]
        rows = conn.execute(f"SELECT consumer, topic, batch_offset, delta FROM {table} ORDER BY consumer").fetchall()
        assert rows == [(name, "t", 64, 9)] + [(f"{name}-{i}", "t", i, 0) for i in range(4)]


def test_postgres_role_without_create_privilege(pg_server: PostgresServer, name: str) -> None:
    table, role = f"cp_{uuid.uuid4().hex[:8]}", f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")  # PostgreSQL 15: no CREATE on schema public
    app_conninfo = pg_server.conninfo.replace("user=postgres", f"user={role}")

    async def main() -> None:
        async with PostgresCheckpoint(app_conninfo, consumer=name, table=table) as app:
            with pytest.raises(CheckpointError, match=f"may not create table {table} .*permission denied"):
                await app.load("t")
            async with PostgresCheckpoint(pg_server.conninfo, consumer="admin", table=table) as admin:
                await admin.ensure_schema()
            with psycopg.connect(pg_server.conninfo, autocommit=True) as conn:
                conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}")
            await app.commit("t", Position(5, 0))  # the table exists now: no CREATE needed
            assert await app.load("t") == Position(5, 0)

    run("trio", main)


def test_redis_key_layout_and_corrupt_values(redis_server: RedisServer, name: str) -> None:
    r = redis.Redis.from_url(redis_server.url)

    async def main() -> None:
        async with RedisCheckpoint(redis_server.url, consumer=name) as cp:
            await cp.commit("orders", Position(4096, 18))
            assert r.hgetall(f"logd:checkpoint:{name}") == {b"orders": b"4096:18"}
            r.hset(f"logd:checkpoint:{name}", "orders", "00004097:0")  # leading zeros still compare right
            await cp.commit("orders", Position(4097, 0))
            assert r.hget(f"logd:checkpoint:{name}", "orders") == b"00004097:0"
            r.hset(f"logd:checkpoint:{name}", "orders", "garbage")
            with pytest.raises(CheckpointError, match="not OFFSET:DELTA"):
                await cp.load("orders")
            with pytest.raises(CheckpointError, match="not OFFSET:DELTA"):
                await cp.commit("orders", Position(5000, 0))
            assert r.hget(f"logd:checkpoint:{name}", "orders") == b"garbage"  # left for a human to look at
            await cp.reset("orders", Position(7, 0))
            assert await cp.load("orders") == Position(7, 0)
        async with RedisCheckpoint(redis_server.url, consumer=name, prefix="app1:") as other:
            await other.commit("orders", Position(1, 0))
            assert r.hget(f"app1:{name}", "orders") == b"1:0"

    try:
        run("asyncio", main)
    finally:
        r.close()


def test_redis_script_and_loader_agree_on_stored_values(redis_server: RedisServer, name: str) -> None:
    r = redis.Redis.from_url(redis_server.url)
    key = f"logd:checkpoint:{name}"
    assert checkpoint_redis.CheckpointUnavailable is CheckpointUnavailable

    async def main() -> None:
        async with RedisCheckpoint(redis_server.url, consumer=name) as cp:
            for bad in ("1" + "0" * 20 + ":0", "0:" + "9" * 20, "9223372036854775808:0", "9999999999999999999:1"):
                r.hset(key, "t", bad)  # more than 64 bits: neither side takes it for a position
                with pytest.raises(CheckpointError, match="not OFFSET:DELTA"):
                    await cp.commit("t", Position(5, 0))
                with pytest.raises(CheckpointError, match="not OFFSET:DELTA"):
                    await cp.load("t")
                assert r.hget(key, "t") == bad.encode()
            r.hset(key, "t", "0" * 25 + "7:0009223372036854775807")  # leading zeros are not digits that count
            assert await cp.load("t") == Position(7, 2**63 - 1)
            await cp.commit("t", Position(7, 5))  # lower: ignored
            assert r.hget(key, "t") == b"0" * 25 + b"7:0009223372036854775807"
            await cp.commit("t", Position(8, 0))
            assert await cp.load("t") == Position(8, 0)
        # decode_responses in the URL: the script's answer is a str, checked all the same
        async with RedisCheckpoint(redis_server.url + "?decode_responses=true", consumer=name) as cp:
            assert await cp.load("t") == Position(8, 0)
            await cp.commit("t", Position(9, 1))
            assert await cp.load("t") == Position(9, 1)
            r.hset(key, "t", "garbage")
            with pytest.raises(CheckpointError, match="not OFFSET:DELTA"):
                await cp.commit("t", Position(10, 0))
            with pytest.raises(CheckpointError, match="not OFFSET:DELTA"):
                await cp.load("t")

    try:
        run("trio", main)
    finally:
        r.close()


# ---------------------------------------------------------------- calls that hang: row locks, a silent server


def store_threads() -> int:
    """Threads of this process running a store's worker function right now."""
    count = 0
    for top in sys._current_frames().values():
        frame: Any = top
        while frame is not None:
            code = frame.f_code
            if code.co_name == "work" and code.co_filename.endswith("_checkpoint_store.py"):
                count += 1
                break
            frame = frame.f_back
    return count


class RowLock:
    """Another session holding the row lock of (consumer, topic) in a transaction, so a commit waits."""

    def __init__(self, conninfo: str, consumer: str, topic: str) -> None:
        self.conninfo, self.consumer, self.topic = conninfo, consumer, topic
        self.conn: psycopg.Connection[Any] | None = None

    def take(self) -> None:
        self.conn = psycopg.connect(self.conninfo)
        row = self.conn.execute("SELECT 1 FROM logd_checkpoints WHERE consumer = %s AND topic = %s FOR UPDATE",
                                (self.consumer, self.topic)).fetchone()
        assert row is not None

    def release(self) -> None:
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
            self.conn = None

    def backends(self, state: str = "") -> int:
        """The store's sessions (application name logd-checkpoint:<consumer>), or those waiting for a lock."""
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND (%s = '' OR wait_event_type = 'Lock')",
                (f"logd-checkpoint:{self.consumer}", state)).fetchone()
        return int(row[0]) if row else 0


async def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    with anyio.fail_after(seconds):
        while not await anyio.to_thread.run_sync(check):  # noqa: ASYNC110 - the state is in the database
            await anyio.sleep(0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aclose_stops_running_and_queued_calls(pg_server: PostgresServer, name: str, backend: str) -> None:
    lock = RowLock(pg_server.conninfo, name, "t")
    errors: dict[str, str] = {}

    async def main() -> None:
        a_done = anyio.Event()
        async with PostgresCheckpoint(pg_server.conninfo, consumer=name) as warm:
            await warm.commit("t", Position(1, 0))
        await anyio.to_thread.run_sync(lock.take)
        cp = PostgresCheckpoint(pg_server.conninfo, consumer=name, timeout=30)

        async def commit(tag: str, pos: Position) -> None:
            try:
                await cp.commit("t", pos)
                errors[tag] = "no error"
            except CheckpointError as exc:
                errors[tag] = str(exc)
            if tag == "A":
                a_done.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(commit, "A", Position(2, 0))
                await eventually(lambda: lock.backends("lock") == 1)  # A waits for the row lock
                tg.start_soon(commit, "B", Position(3, 0))  # B queues behind A
                for _ in range(20):
                    await anyio.lowlevel.checkpoint()
                with anyio.fail_after(2):
                    await cp.aclose()
                    await a_done.wait()  # stopped, not left to wait 30 s for the lock
        finally:
            await anyio.to_thread.run_sync(lock.release)
        # no connection of the closed store is left, and none was opened for B
        await eventually(lambda: lock.backends() == 0)

    run(backend, main)
    assert errors["A"].endswith("is closed") and errors["B"].endswith("is closed"), errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_abandoned_call_does_not_hold_the_next_one(pg_server: PostgresServer, name: str, backend: str) -> None:
    lock = RowLock(pg_server.conninfo, name, "t")
    # the server would cancel the stuck statement only after 20 s: the store does not override it
    patient = pg_server.conninfo + " options='-c statement_timeout=20000'"

    async def main() -> None:
        async with PostgresCheckpoint(pg_server.conninfo, consumer=name) as warm:
            await warm.commit("t", Position(1, 0))
        await anyio.to_thread.run_sync(lock.take)
        try:
            async with PostgresCheckpoint(patient, consumer=name, timeout=10) as cp:
                with anyio.move_on_after(0.3) as scope:  # a cancelled caller
                    await cp.commit("t", Position(2, 0))
                assert scope.cancelled_caught
                with anyio.fail_after(3):  # the next calls run on a new connection, not behind the stuck one
                    assert await cp.load("t") == Position(1, 0)
                    await cp.commit("u", Position(4, 0))
                    assert await cp.load("u") == Position(4, 0)
                await eventually(lambda: store_threads() == 0, 3)  # the stuck thread was woken, the lock is held
            async with PostgresCheckpoint(patient, consumer=name, timeout=0.5) as cp:
                with pytest.raises(CheckpointUnavailable, match=r"did not answer within 0\.5 s"):  # a timeout
                    await cp.commit("t", Position(3, 0))
                with anyio.fail_after(3):
                    assert await cp.load("u") == Position(4, 0)
                await eventually(lambda: store_threads() == 0, 3)
        finally:
            await anyio.to_thread.run_sync(lock.release)

    run(backend, main)


def test_postgres_statement_timeout_of_the_conninfo_is_kept(pg_server: PostgresServer, name: str) -> None:
    lock = RowLock(pg_server.conninfo, name, "t")
    quick = pg_server.conninfo + " options='-c statement_timeout=300'"

    async def main() -> None:
        async with PostgresCheckpoint(pg_server.conninfo, consumer=name) as warm:
            await warm.commit("t", Position(1, 0))
        await anyio.to_thread.run_sync(lock.take)
        try:
            async with PostgresCheckpoint(quick, consumer=name, timeout=10) as cp:
                start = time.monotonic()
                with pytest.raises(CheckpointUnavailable, match="statement timeout"):
                    await cp.commit("t", Position(2, 0))
                assert time.monotonic() - start < 3  # the server cancelled it after 0.3 s, not after 10 s
                assert await cp.load("t") == Position(1, 0)  # the same connection goes on
        finally:
            await anyio.to_thread.run_sync(lock.release)

    run("trio", main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_silent_postgres_leaves_no_thread_behind(own_pg: PostgresServer, backend: str) -> None:
    async def main() -> None:
        async with PostgresCheckpoint(own_pg.conninfo, consumer="etl", timeout=0.5) as cp:
            await cp.commit("t", Position(1, 0))
            own_pg.pause()
            try:
                for _ in range(6):
                    with pytest.raises(CheckpointUnavailable):
                        with anyio.fail_after(1.5):
                            await cp.commit("t", Position(2, 0))
                    assert store_threads() <= MAX_STUCK + 1  # bounded the same under Trio and asyncio
                await eventually(lambda: store_threads() == 0, 8)
                # calls arriving one after the other, each queued behind the one before
                most = 0

                async def caller() -> None:
                    with pytest.raises(CheckpointUnavailable):
                        await cp.commit("t", Position(3, 0))

                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        tg.start_soon(caller)
                        for _ in range(3):  # sampled while they come and go: a bound, not a timing
                            await anyio.sleep(0.05)
                            most = max(most, store_threads())
                assert most <= MAX_STUCK + 1
                # all woken or timed out (libpq's connect_timeout) while the server is still silent
                await eventually(lambda: store_threads() == 0, 8)
                assert cp.stuck_calls == 0
            finally:
                own_pg.resume()
            with anyio.fail_after(10):
                while True:
                    try:
                        assert await cp.load("t") in (Position(1, 0), Position(2, 0))
                        break
                    except CheckpointUnavailable:
                        await anyio.sleep(0.1)

    run(backend, main)


def test_harness_only_trusts_its_own_server(pg_server: PostgresServer, redis_server: RedisServer) -> None:
    # a server that took the chosen port meanwhile is not mistaken for the one being started
    assert pg_server._ready() and redis_server._ready()
    other_pg, other_redis = PostgresServer(), RedisServer()
    try:
        other_pg.port, other_redis.port = pg_server.port, redis_server.port
        assert not other_pg._ready()
        assert not other_redis._ready()
    finally:
        other_pg.close()
        other_redis.close()
    assert not other_pg.dir.exists() and not other_redis.dir.exists()


def test_harness_cleans_up_after_a_failed_initdb(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Path(tempfile.mkdtemp(prefix="logd-fake-pg-", dir="/tmp"))  # reachable for nobody when run as root
    try:
        fake.chmod(0o755)
        (fake / "initdb").write_text("#!/bin/sh\necho cannot create the cluster\nexit 3\n")
        (fake / "initdb").chmod(0o755)
        monkeypatch.setenv("LOGD_PG_BIN", str(fake))
        before = set(Path(tempfile.gettempdir()).glob("logd-postgres-*")) | set(Path("/tmp").glob("logd-postgres-*"))
        with pytest.raises(RuntimeError, match=r"initdb failed:\n.*cannot create the cluster"):
            PostgresServer()
        after = set(Path(tempfile.gettempdir()).glob("logd-postgres-*")) | set(Path("/tmp").glob("logd-postgres-*"))
        assert after <= before  # its temporary directory is gone
    finally:
        shutil.rmtree(fake, ignore_errors=True)


# ---------------------------------------------------------------- a database that goes away


def own_server(kind: str, request: pytest.FixtureRequest) -> PostgresServer | RedisServer:
    srv = request.getfixturevalue("own_pg" if kind == "postgres" else "own_redis")
    assert isinstance(srv, PostgresServer | RedisServer)
    return srv


def bounded(seconds: float) -> Callable[[Callable[[], Awaitable[Any]]], Awaitable[float]]:
    async def measure(fn: Callable[[], Awaitable[Any]]) -> float:
        start = time.monotonic()
        with pytest.raises(CheckpointError) as info:
            await fn()
        took = time.monotonic() - start
        assert took < seconds, f"took {took:.1f} s: {info.value}"
        return took

    return measure


@pytest.mark.parametrize("backend", BACKENDS)
def test_database_restarted_under_a_consumer(kind: str, request: pytest.FixtureRequest, backend: str) -> None:
    srv = own_server(kind, request)
    make = factory(kind, srv)
    quick = bounded(3.0)

    async def main() -> None:
        async with make("billing", timeout=2) as cp:
            await cp.commit("t", Position(100, 0))
            await anyio.to_thread.run_sync(srv.stop)  # restarted between two calls: the next one just works
            await anyio.to_thread.run_sync(srv.start)
            assert await cp.load("t") == Position(100, 0)
            for down in (srv.stop, srv.crash):  # a clean stop, then a crash
                await anyio.to_thread.run_sync(down)
                await quick(lambda: cp.commit("t", Position(200, 0)))
                await quick(lambda: cp.load("t"))
                with pytest.raises(CheckpointError, match=r"unavailable: .*(refused|connect)"):
                    await cp.load("t")
                await anyio.to_thread.run_sync(srv.start)
                assert await cp.load("t") == Position(100, 0)  # nothing lost, reconnected on the next call
            await cp.commit("t", Position(200, 0))
            assert await cp.load("t") == Position(200, 0)

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_silent_database_times_out_then_recovers(kind: str, request: pytest.FixtureRequest, backend: str) -> None:
    srv = own_server(kind, request)
    make = factory(kind, srv)

    async def main() -> None:
        async with make("billing", timeout=0.5) as cp:
            await cp.commit("t", Position(100, 0))
            srv.pause()  # the process is alive, its sockets accept, nothing answers
            try:
                for _ in range(3):  # each call gives up on its own: no queue behind a stuck call
                    await bounded(2.0)(lambda: cp.commit("t", Position(200, 0)))
                with pytest.raises(CheckpointUnavailable, match=r"did not answer within 0\.5 s|not answering"):
                    await cp.load("t")
                async with make("billing", timeout=30) as patient:  # a cancelled caller is not held either
                    start = time.monotonic()
                    with anyio.move_on_after(0.2) as scope:
                        await patient.commit("t", Position(250, 0))
                    assert scope.cancelled_caught and time.monotonic() - start < 1.5
            finally:
                srv.resume()
            with anyio.fail_after(10):
                while True:  # the abandoned calls may still land (at most the higher position)
                    try:
                        pos = await cp.load("t")
                        break
                    except CheckpointError:
                        await anyio.sleep(0.1)
            assert pos in (Position(100, 0), Position(200, 0), Position(250, 0))
            await cp.commit("t", Position(300, 0))
            assert await cp.load("t") == Position(300, 0)

    run(backend, main)


# ---------------------------------------------------------------- end to end: logd server + Scanner (Trio)


async def consume(client: Client, topic: str, cp: Checkpoint, **kw: Any) -> list[Message]:
    out: list[Message] = []
    async with client.scanner(topic, checkpoint=cp, **kw) as s:
        async for m in s:
            out.append(m)
    return out


async def write_all(client: Client, topic: str, batches: int, per_batch: int) -> list[bytes]:
    bodies = [f"m{i}".encode() for i in range(batches * per_batch)]
    for b in range(batches):
        await client.batch(topic, bodies[b * per_batch:(b + 1) * per_batch])
    return bodies


async def test_scanner_resumes_after_consumer_restart(client: Client, make: Factory, name: str) -> None:
    bodies = await write_all(client, "e2e", batches=5, per_batch=3)
    async with make(name) as cp:
        first = await consume(client, "e2e", cp, limit=7)
    assert [m.body for m in first] == bodies[:7]
    async with make(name) as cp:  # the consumer restarted
        rest = await consume(client, "e2e", cp)
        assert [m.body for m in rest] == bodies[7:]
        assert await consume(client, "e2e", cp) == []
        more = await write_all(client, "e2e", batches=1, per_batch=2)
        assert [m.body for m in await consume(client, "e2e", cp)] == more
    async with make(name + "-other") as other:  # another consumer starts from the oldest
        assert len(await consume(client, "e2e", other)) == len(bodies) + 2


async def test_scanner_with_database_down_loses_no_message(
    client: Client, kind: str, request: pytest.FixtureRequest
) -> None:
    srv = own_server(kind, request)
    make = factory(kind, srv)
    bodies = await write_all(client, "down", batches=10, per_batch=2)
    seen: list[bytes] = []
    async with make("etl", timeout=2) as cp:
        with pytest.raises(CheckpointError, match="unavailable"):
            async with client.scanner("down", checkpoint=cp, read_size=2) as s:
                async for m in s:
                    seen.append(m.body)
                    if len(seen) == 6:
                        await trio.to_thread.run_sync(srv.stop)  # the next commit fails
        assert seen == bodies[:6]
        await trio.to_thread.run_sync(srv.start)
        committed = await cp.load("down")
    async with make("etl") as cp:  # a restarted consumer resumes at the last committed position
        rest = [m.body for m in await consume(client, "down", cp)]
    assert committed is not None
    assert rest == bodies[len(bodies) - len(rest):]  # a suffix: nothing skipped
    assert len(rest) >= len(bodies) - len(seen)  # at-least-once: resumes at or before where it stopped
