"""PostgresCheckpoint: consumer positions in a PostgreSQL table (``pip install 'logd-trio[postgres]'``).

One row per (consumer, topic) in ``logd_checkpoints`` (see :data:`SCHEMA` and
docs/state.md).  A commit is one autocommitted upsert whose update only
applies when the stored position is lower, so concurrent commits for the same
consumer never move its position backwards; when the statement returns the
row is committed (durable under the server's ``synchronous_commit``).

Driver: psycopg 3's *sync* connection in a worker thread
(``anyio.to_thread``), because psycopg's async connection runs on asyncio
only; this way the handler works under Trio and asyncio alike.  A checkpoint
write is a few per second at most, so the thread hop costs nothing that
matters.

Bounds: connecting waits at most ``connect_timeout`` (libpq, whole seconds,
at least 2), a statement at most ``timeout`` (``statement_timeout``, unless
the conninfo's ``options`` or PGOPTIONS set it, and TCP's ``tcp_user_timeout``
for a peer that vanished), and every call returns or raises
:class:`~logd_trio.core.errors.CheckpointError` within ``timeout`` seconds
even if the server is alive but silent.  psycopg's sync connection has no
read timeout, so the thread of an abandoned call is woken by shutting its
socket down.  A connection broken by a server restart is replaced on the next
call (once per call, transparently); while the server is down or silent each
call raises :class:`CheckpointUnavailable` (a ``CheckpointError``) naming the
store and the driver's reason.  Nothing is cached: a failed commit leaves the
stored position as it was, and the scanner commits again later.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from logd_trio.client._checkpoint_store import (
    CheckpointUnavailable,
    Slot,
    ThreadedStore,
    check_consumer,
    check_position,
    check_topic,
    first_line,
    shutdown_socket,
)
from logd_trio.client.checkpoint import Position
from logd_trio.core.errors import CheckpointError

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("PostgresCheckpoint needs psycopg 3: pip install 'logd-trio[postgres]'") from exc

__all__ = ["SCHEMA", "CheckpointUnavailable", "PostgresCheckpoint"]

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]

#: The table, created on first use (``create_schema=True``) or by :meth:`PostgresCheckpoint.ensure_schema`.
SCHEMA = """\
CREATE TABLE IF NOT EXISTS {table} (
    consumer     text        NOT NULL,
    topic        text        NOT NULL,
    batch_offset bigint      NOT NULL CHECK (batch_offset >= 0),
    delta        bigint      NOT NULL CHECK (delta >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic)
)"""

_COMMIT = """\
INSERT INTO {table} AS t (consumer, topic, batch_offset, delta) VALUES (%s, %s, %s, %s)
ON CONFLICT (consumer, topic) DO UPDATE
    SET batch_offset = EXCLUDED.batch_offset, delta = EXCLUDED.delta, updated_at = now()
    WHERE (t.batch_offset, t.delta) < (EXCLUDED.batch_offset, EXCLUDED.delta)"""

_RESET = """\
INSERT INTO {table} AS t (consumer, topic, batch_offset, delta) VALUES (%s, %s, %s, %s)
ON CONFLICT (consumer, topic) DO UPDATE
    SET batch_offset = EXCLUDED.batch_offset, delta = EXCLUDED.delta, updated_at = now()"""

_LOAD = "SELECT batch_offset, delta FROM {table} WHERE consumer = %s AND topic = %s"
_DELETE = "DELETE FROM {table} WHERE consumer = %s AND topic = %s"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _table_name(table: str) -> sql.Identifier:
    parts = table.split(".") if isinstance(table, str) else []
    if not 1 <= len(parts) <= 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise ValueError(f"table must be NAME or SCHEMA.NAME of [A-Za-z0-9_] not starting with a digit, not {table!r}")
    return sql.Identifier(*parts)


class PostgresCheckpoint(ThreadedStore[Conn]):
    """Positions of consumer ``consumer`` in a PostgreSQL table.

    ``conninfo`` is a libpq connection string or URL
    (``"host=db port=5432 dbname=app user=app"``, ``"postgresql://app@db/app"``).
    ``consumer`` names this consumer (one row per consumer and topic); give
    every independent consumer its own name, and the same name to the
    instances that must resume one another.  ``create_schema=False`` when the
    table is created by a migration (:data:`SCHEMA`).
    """

    def __init__(
        self,
        conninfo: str = "",
        *,
        consumer: str,
        table: str = "logd_checkpoints",
        create_schema: bool = True,
        timeout: float = 5.0,
    ) -> None:
        self.consumer = check_consumer(consumer)
        self.table = table
        self._ident = ident = _table_name(table)
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            raise ValueError(f"invalid PostgreSQL conninfo: {first_line(exc)}") from exc
        where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}/{params.get('dbname', '')}"
        super().__init__(what=f"postgres checkpoint store {where}", timeout=timeout)
        params.setdefault("connect_timeout", max(2, math.ceil(self.timeout)))
        params.setdefault("tcp_user_timeout", math.ceil(self.timeout * 1000))
        params.setdefault("application_name", f"logd-checkpoint:{self.consumer}"[:63])
        self._conninfo = make_conninfo("", **params)
        self.create_schema = create_schema
        self._schema_done = False
        self._sql = {name: sql.SQL(text).format(table=ident)
                     for name, text in (("schema", SCHEMA), ("commit", _COMMIT), ("reset", _RESET),
                                        ("load", _LOAD), ("delete", _DELETE))}

    # ------------------------------------------------------------ the Checkpoint protocol

    async def load(self, topic: str) -> Position | None:
        """The committed position of this consumer for ``topic``, or ``None``."""
        check_topic(topic)

        def op(conn: Conn) -> Position | None:
            row = conn.execute(self._sql["load"], (self.consumer, topic)).fetchone()
            return None if row is None else Position(int(row[0]), int(row[1]))

        return await self.call(lambda slot: self._run(slot, op))

    async def commit(self, topic: str, position: Position) -> None:
        """Record ``position`` unless a higher one is already stored (never moves backwards)."""
        check_topic(topic)
        check_position(position)
        args = (self.consumer, topic, position.offset, position.delta)
        await self.call(lambda slot: self._run(slot, lambda conn: conn.execute(self._sql["commit"], args)))

    # ------------------------------------------------------------ administration

    async def reset(self, topic: str, position: Position | None = None) -> None:
        """Set the position unconditionally (also backwards), or forget it when ``position`` is None."""
        check_topic(topic)
        args: tuple[str | int, ...]
        if position is None:
            stmt, args = self._sql["delete"], (self.consumer, topic)
        else:
            check_position(position)
            stmt, args = self._sql["reset"], (self.consumer, topic, position.offset, position.delta)
        await self.call(lambda slot: self._run(slot, lambda conn: conn.execute(stmt, args)))

    async def ensure_schema(self) -> None:
        """Create the table if it does not exist (needs the CREATE privilege on the schema)."""
        await self.call(lambda slot: self._run(slot, self._create))

    # ------------------------------------------------------------ worker-thread side

    def _close_conn(self, conn: Conn) -> None:
        conn.close()

    def _create(self, conn: Conn) -> None:
        """Create the table unless it exists (checked first: a role without CREATE may use an existing one)."""
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self._ident.as_string(conn),)).fetchone()
        if not (row and row[0]):
            try:
                # UniqueViolation etc.: created concurrently by another consumer, so the table is there.
                with contextlib.suppress(pg_errors.UniqueViolation, pg_errors.DuplicateTable,
                                         pg_errors.DuplicateObject):
                    conn.execute(self._sql["schema"])
            except pg_errors.InsufficientPrivilege as exc:
                raise CheckpointError(
                    f"{self.what}: may not create table {self.table} ({first_line(exc)}): create it as a role "
                    "that may (PostgresCheckpoint.ensure_schema() or SCHEMA, docs/state.md)"
                ) from exc
        self._schema_done = True

    def _interrupt(self, conn: Conn) -> None:
        # psycopg's sync connection has no read timeout: a thread abandoned on a silent server would
        # wait forever.  Shutting the socket down makes its wait return with a broken connection.
        shutdown_socket(conn.fileno())

    def _setup(self, conn: Conn) -> None:
        """A new session: ``statement_timeout`` unless the client set it (conninfo ``options``, PGOPTIONS)."""
        conn.execute("SELECT set_config('statement_timeout', %s, false) FROM pg_settings "
                     "WHERE name = 'statement_timeout' AND source <> 'client'",
                     (f"{math.ceil(self.timeout * 1000)}",))
        if self.create_schema and not self._schema_done:
            self._create(conn)

    def _run(self, slot: Slot[Conn], op: Callable[[Conn], T]) -> T:
        """``op`` on the slot's connection; a connection found broken (server restarted) is replaced once."""
        while True:
            fresh = slot.conn is None
            try:
                conn = slot.conn
                if conn is None:
                    # attached before the session setup, so that aclose() or an abandon can wake it
                    conn = self.attach(slot, psycopg.connect(self._conninfo, autocommit=True))
                    try:
                        self._setup(conn)
                    except BaseException:
                        self.drop(slot)
                        raise
                return op(conn)
            except psycopg.OperationalError as exc:
                broken = slot.conn is None or slot.conn.broken or slot.conn.closed
                if broken:
                    self.drop(slot)
                self.stopped(slot)  # woken by aclose() or an abandon: no retry
                if broken and not fresh:
                    continue  # a connection from before a restart: try once with a new one
                if isinstance(exc, pg_errors.QueryCanceled):
                    raise CheckpointUnavailable(f"{self.what} did not answer in time: {first_line(exc)}") from exc
                raise CheckpointUnavailable(f"{self.what} is unavailable: {first_line(exc)}") from exc
            except pg_errors.UndefinedTable as exc:
                raise CheckpointError(
                    f"{self.what}: table {self.table} does not exist: call ensure_schema() "
                    "or create it (PostgresCheckpoint SCHEMA, docs/state.md)"
                ) from exc
            except psycopg.Error as exc:
                if slot.conn is not None and (slot.conn.broken or slot.conn.closed):
                    self.drop(slot)
                raise CheckpointError(f"{self.what}: {first_line(exc)}") from exc
