"""RedisCheckpoint: consumer positions in Redis (``pip install 'logd-trio[redis]'``).

Key layout: one hash per consumer, ``<prefix><consumer>`` (default prefix
``logd:checkpoint:``), with one field per topic whose value is the position
as ``OFFSET:DELTA`` (the form ``logd read -n`` prints), e.g.
``HGET logd:checkpoint:billing orders`` -> ``"4096:18"``.  A commit runs a
small Lua script that compares the stored position with the new one and
writes only when the new one is higher, atomically in Redis, so concurrent
commits for the same consumer never move its position backwards.

Durability is Redis's own: a commit returns once Redis applied it in memory;
it survives a Redis restart when the server persists (``appendonly yes``,
with ``appendfsync everysec`` or ``always``; RDB snapshots alone lose the
commits since the last snapshot, which at-least-once tolerates: the consumer
then sees some messages again).

Driver: redis-py's *sync* client in a worker thread (``anyio.to_thread``),
because redis-py's asyncio client runs on asyncio only; this way the handler
works under Trio and asyncio alike.  Connecting and each command are bounded
by ``timeout`` (socket timeouts, no driver retries), and every call returns or
raises :class:`~logd_trio.core.errors.CheckpointError` within ``timeout``
seconds (the socket timeouts also end the thread of an abandoned call).  A
connection broken by a Redis restart is replaced on the next call (once per
call, transparently); while Redis is down or silent each call raises
:class:`CheckpointUnavailable` (a ``CheckpointError``) naming the store and the
driver's reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar, cast

from logd_trio.client._checkpoint_store import (
    CheckpointUnavailable,
    Slot,
    ThreadedStore,
    check_consumer,
    check_position,
    check_topic,
    first_line,
)
from logd_trio.client.checkpoint import Position
from logd_trio.core.errors import CheckpointError

try:
    import redis
    from redis import connection as _connection
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("RedisCheckpoint needs redis-py: pip install 'logd-trio[redis]'") from exc

__all__ = ["COMMIT_SCRIPT", "CheckpointUnavailable", "RedisCheckpoint"]

T = TypeVar("T")
_parse_url = cast(Callable[[str], dict[str, Any]], _connection.parse_url)  # untyped in redis-py

#: Compare-and-set of one position.  KEYS[1]: the consumer's hash; ARGV: topic, offset, delta
#: (decimal, no leading zeros).  Returns 1 when written, 0 when the stored position is not lower,
#: or the stored value when it is not a position (OFFSET:DELTA, each at most 2**63-1: the rule
#: RedisCheckpoint's loader applies too).  Digits are compared as strings (length, then byte by
#: byte), so every 64-bit position compares exactly (Lua numbers are doubles).
COMMIT_SCRIPT = """\
local MAX = '9223372036854775807'
local function less(a, b)
  if #a ~= #b then return #a < #b end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return false
end
local function norm(d) return (string.gsub(d, '^0+(%d)', '%1')) end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local co, cd = string.match(cur, '^(%d+):(%d+)$')
  if not co then return cur end
  co, cd = norm(co), norm(cd)
  if less(MAX, co) or less(MAX, cd) then return cur end
  if not (less(co, ARGV[2]) or (co == ARGV[2] and less(cd, ARGV[3]))) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
return 1
"""

_VALUE = re.compile(rb"0*(\d{1,19}):0*(\d{1,19})")


class RedisCheckpoint(ThreadedStore[redis.Redis]):
    """Positions of consumer ``consumer`` in Redis at ``url`` (``redis://[user:password@]host:port/db``,
    ``rediss://`` for TLS, ``unix:///path``).

    ``consumer`` names this consumer (its own hash); give every independent
    consumer its own name, and the same name to the instances that must
    resume one another.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        consumer: str,
        prefix: str = "logd:checkpoint:",
        timeout: float = 5.0,
    ) -> None:
        self.consumer = check_consumer(consumer)
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string, not {prefix!r}")
        try:
            params = _parse_url(url)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"invalid Redis URL {url!r}: {first_line(exc)}") from exc
        where = params.get("path") or f"{params.get('host', 'localhost')}:{params.get('port', 6379)}"
        super().__init__(what=f"redis checkpoint store {where}/{params.get('db', 0)}", timeout=timeout)
        self.url = url
        self.key = prefix + self.consumer
        # CLIENT SETNAME takes only '!'..'~': other characters of the consumer name become '_'.
        self._client_name = "logd-checkpoint:" + "".join(c if "!" <= c <= "~" else "_" for c in self.consumer)

    # ------------------------------------------------------------ the Checkpoint protocol

    async def load(self, topic: str) -> Position | None:
        """The committed position of this consumer for ``topic``, or ``None``."""
        check_topic(topic)

        def op(r: redis.Redis) -> Position | None:
            raw = r.hget(self.key, topic)
            if raw is None:
                return None
            return self._parse(raw if isinstance(raw, bytes) else raw.encode(), topic)

        return await self.call(lambda slot: self._run(slot, op))

    async def commit(self, topic: str, position: Position) -> None:
        """Record ``position`` unless a higher one is already stored (never moves backwards)."""
        check_topic(topic)
        check_position(position)

        def op(r: redis.Redis) -> None:
            res = r.eval(COMMIT_SCRIPT, 1, self.key, topic, str(position.offset), str(position.delta))
            if isinstance(res, bytes | str):  # str when the URL asks for decode_responses
                self._parse(res if isinstance(res, bytes) else res.encode(), topic)  # raises: not a position

        await self.call(lambda slot: self._run(slot, op))

    # ------------------------------------------------------------ administration

    async def reset(self, topic: str, position: Position | None = None) -> None:
        """Set the position unconditionally (also backwards), or forget it when ``position`` is None."""
        check_topic(topic)
        if position is not None:
            check_position(position)

        def op(r: redis.Redis) -> None:
            if position is None:
                r.hdel(self.key, topic)
            else:
                r.hset(self.key, topic, f"{position.offset}:{position.delta}")

        await self.call(lambda slot: self._run(slot, op))

    # ------------------------------------------------------------ worker-thread side

    def _parse(self, raw: bytes, topic: str) -> Position:
        m = _VALUE.fullmatch(raw)
        if m is None or max(int(m[1]), int(m[2])) >= 2**63:
            raise CheckpointError(
                f"{self.what}: {self.key} field {topic!r} holds {raw[:40]!r}, not OFFSET:DELTA "
                "(fix it, or reset() the position)"
            )
        return Position(int(m[1]), int(m[2]))

    def _close_conn(self, conn: redis.Redis) -> None:
        conn.close()

    def _open(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),  # no hidden retries: the bound stays `timeout`
            max_connections=2,
            client_name=self._client_name,
        )

    def _run(self, slot: Slot[redis.Redis], op: Callable[[redis.Redis], T]) -> T:
        """``op`` with the slot's client; a connection broken by a Redis restart is replaced once."""
        while True:
            fresh = slot.conn is None
            try:
                conn = slot.conn if slot.conn is not None else self.attach(slot, self._open())
                return op(conn)
            except redis.TimeoutError as exc:
                self.drop(slot)
                self.stopped(slot)
                raise CheckpointUnavailable(f"{self.what} did not answer within {self.timeout:g} s") from exc
            except redis.ConnectionError as exc:  # also BusyLoadingError (Redis is loading its data)
                self.drop(slot)
                self.stopped(slot)  # closed or abandoned meanwhile: no retry
                if not fresh:
                    continue  # a connection from before a restart: try once with a new one
                raise CheckpointUnavailable(f"{self.what} is unavailable: {first_line(exc)}") from exc
            except redis.RedisError as exc:
                raise CheckpointError(f"{self.what}: {first_line(exc)}") from exc
