"""Clients of a logd cluster: several addresses, the leader found, and a writer that survives a failover.

- :func:`parse_hosts` reads ``HOST:PORT[,HOST:PORT...]``.
- :func:`find_leader` asks each address ``CLUSTER`` (a logd-trio extension) and returns the
  node that leads and may acknowledge now, or the leader a follower names; a server without
  the extension (Go logd, a single node) is taken as it is.
- :class:`~logd_trio.client.cluster_client.ClusterClient` (its own module) is a client over several addresses.
- :class:`FailoverWriter` pipelines batches to the leader.  When a batch is refused because
  the node does not lead (``ERR not leader [HOST:PORT]``, ``ERR fenced``), cannot acknowledge
  (``ERR not enough replicas``), or its connection breaks or times out, the writer finds the
  leader again (for at most ``give_up`` seconds) and resends, in order, every batch not yet
  acknowledged.  Delivery is **at least once**: a batch whose OK was lost in the failover may
  have been stored, and is then stored twice.  Any other ``ERR`` is final: :class:`WriteFailed`
  says how many messages were not acknowledged.

All of them take the ``ssl_context`` (TLS on every connection, the CLUSTER probes included) and the
``token`` (``AUTH`` first on every connection) of a TLS or authenticating cluster.
"""

from __future__ import annotations

import collections
import json
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import anyio

from logd_trio.client.transport import Connection, RetryPolicy, TLSTimeout, authenticate, connect
from logd_trio.core.addresses import AddressError, format_address, parse_address
from logd_trio.core.defaults import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_REPLY
from logd_trio.core.errors import (
    BadReply,
    ConnectionLost,
    MessageTooLarge,
    NotAllowed,
    Timeout,
    Unsupported,
    WriteFailed,
)
from logd_trio.core.framing import build_body, framed_size
from logd_trio.core.replies import ErrorReply, MokReply, OffsetReply, ReplyKind
from logd_trio.core.requests import encode_batch
from logd_trio.core.tls import TLSFailed

__all__ = ["FailoverWriter", "Secure", "ask_cluster", "find_leader", "find_member", "parse_hosts",
           "retriable"]

_ONE_TRY = RetryPolicy(attempts=1, initial=0.05, maximum=0.05, connect_timeout=1.0)
_UNREACHABLE = (OSError, ConnectionLost, BadReply, TimeoutError)


@dataclass(frozen=True, slots=True)
class Secure:
    """How to open a connection to any node of a cluster: TLS (``ssl_context``, the certificate
    checked against ``tls_hostname`` or else the address's host) and ``AUTH`` with ``token``."""

    ssl_context: ssl.SSLContext | None = None
    token: str | None = field(default=None, repr=False)  # a secret
    tls_hostname: str | None = None

    def __post_init__(self) -> None:  # a malformed token is said once, not taken for unreachable nodes
        if self.token is not None and (not self.token or not self.token.isascii()
                                       or any(c.isspace() or not c.isprintable() for c in self.token)):
            raise ValueError("a token is printable ASCII without spaces")

    async def connect(self, address: str, retry: RetryPolicy = _ONE_TRY,
                      max_reply: int = DEFAULT_MAX_REPLY) -> Connection:
        conn = await connect(address, retry=retry, max_reply=max_reply, ssl_context=self.ssl_context,
                             tls_hostname=self.tls_hostname)
        if self.token is not None:
            try:
                await authenticate(conn, self.token)
            except BaseException:
                await conn.aclose()
                raise
        return conn


PLAIN = Secure()


def parse_hosts(text: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` -> the addresses; :class:`AddressError` names a bad one."""
    out = [format_address(*parse_address(part)) for part in text.split(",") if part.strip()]
    if not out:
        raise AddressError(f"invalid address list {text!r}: expected HOST:PORT[,HOST:PORT...]")
    return out


def retriable(reason: str) -> bool:
    """A refusal another node (or a moment later) may not give: the cluster is changing leader."""
    return reason.startswith(("not leader", "fenced", "not enough replicas"))


def _redirect(reason: str) -> str | None:
    """``not leader HOST:PORT`` -> ``HOST:PORT`` (None without a usable hint)."""
    words = reason.split()
    if len(words) == 3 and words[:2] == ["not", "leader"]:
        try:
            return format_address(*parse_address(words[2]))
        except AddressError:
            return None
    return None


async def ask_cluster(address: str, limit: float, secure: Secure = PLAIN) -> dict[str, object] | None:
    """The node's CLUSTER view; None if it does not have the extension.  Raises on a lost connection."""
    with anyio.fail_after(limit):
        conn = await secure.connect(address)
        try:
            await conn.send(b"CLUSTER\r\n")
            reply = await conn.receive(ReplyKind.MOK)
        finally:
            await conn.aclose()
    if isinstance(reply, MokReply):
        body = json.loads(reply.body)
        return body if isinstance(body, dict) else None
    return None


async def find_leader(addresses: Sequence[str], *, per_node: float = 2.0, secure: Secure = PLAIN) -> str | None:
    """The address of the node that leads and may acknowledge; else a leader some node names;
    else the first address that answers without the extension; None if none answers.  A TLS
    handshake every node refused is raised (:class:`~logd_trio.core.tls.TLSFailed`): a wrong
    certificate is not a failover."""
    leader, _ = await _survey(addresses, per_node, secure)
    return leader


async def find_member(addresses: Sequence[str], *, per_node: float = 2.0, secure: Secure = PLAIN) -> str | None:
    """The leader's address (as :func:`find_leader`), else the first node that answers (a follower:
    reads work there); None if none answers."""
    leader, member = await _survey(addresses, per_node, secure)
    return leader or member


async def _survey(addresses: Sequence[str], per_node: float, secure: Secure) -> tuple[str | None, str | None]:
    """(the leader as find_leader says, the first address that answered CLUSTER)."""
    named: list[str] = []
    plain: str | None = None
    member: str | None = None
    refused: TLSFailed | None = None
    for address in addresses:
        try:
            view = await ask_cluster(address, per_node, secure)
        except TLSTimeout:
            continue  # no handshake: a node that does not run (paused, partitioned) as much as a refusal
        except TLSFailed as exc:
            refused = exc
            continue
        except _UNREACHABLE:
            continue
        except (NotAllowed, Unsupported) as exc:  # the token refused (or AUTH unknown): final, said with the node
            raise type(exc)(f"{address}: {exc}", reason=exc.reason) from exc
        member = member or address
        if view is None:
            plain = plain or address
            continue
        if view.get("role") == "leader" and view.get("refusal") is None:
            return address, member
        leader = view.get("leader")
        if isinstance(leader, dict) and isinstance(leader.get("addr"), str) and view.get("role") != "leader":
            named.append(str(leader["addr"]))
    if member is None and refused is not None:
        raise refused
    for address in named:  # a leader not in the list (say, one that restarted elsewhere)
        try:
            view = await ask_cluster(address, per_node, secure)
        except _UNREACHABLE:
            continue
        if view is not None and view.get("role") == "leader" and view.get("refusal") is None:
            return address, member
    return plain, member


class FailoverWriter:
    """See the module docstring.  ``async with FailoverWriter(addresses, topic) as w: await w.write_many(...)``;
    leaving the block normally flushes."""

    def __init__(self, addresses: Sequence[str], topic: str, *, batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 window: int = 32, timeout: float = 10.0, give_up: float = 30.0,
                 on_ack: Callable[[int, int], None] | None = None, secure: Secure = PLAIN) -> None:
        if not addresses:
            raise ValueError("at least one address")
        self.addresses = list(addresses)
        self.topic = topic
        self.batch_size = max(64, min(batch_size, DEFAULT_MAX_BATCH_SIZE))
        self.window = max(1, window)
        self.timeout = timeout
        self.give_up = give_up
        self.on_ack = on_ack
        self.secure = secure
        self.acked_messages = 0
        self.acked_batches = 0
        self.resent_batches = 0  # batches sent again after a failover (each may now be stored twice)
        self.failovers = 0
        self.leader: str | None = None
        self._conn: Connection | None = None
        self._unacked: collections.deque[tuple[bytes, int]] = collections.deque()  # (request, messages)
        self._in_flight = 0  # of _unacked, how many were sent on the current connection
        self._parts: list[bytes] = []
        self._size = 0
        self._why = "no leader found"
        self._failing_since: float | None = None  # the first failure since the last OK (the give_up bound)
        self._backoff = 0.0  # before the next resend: doubles from 50 ms up to 1 s, reset by an OK
        self._attempts = 0  # resends since the last OK

    async def __aenter__(self) -> FailoverWriter:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: object) -> None:
        try:
            if et is None:
                await self.flush()
        finally:
            await self._drop()

    @property
    def pending_messages(self) -> int:
        return sum(n for _, n in self._unacked) + len(self._parts)

    async def write(self, message: bytes) -> None:
        await self.write_many([message])

    async def write_many(self, messages: Iterable[bytes]) -> int:
        """Queue and send ``messages`` (sealing the last partial batch); returns how many.

        Raises :class:`MessageTooLarge`, having queued none of them, if one cannot fit in a batch."""
        messages = messages if isinstance(messages, (list, tuple)) else list(messages)
        line = 48 + len(self.topic)  # room for "BATCH <size> <topic> <crc> <count>\r\n"
        longest = max(map(len, messages), default=0)
        if framed_size(longest) + line > self.batch_size:
            raise MessageTooLarge(f"message of {longest} bytes does not fit in a batch of {self.batch_size}")
        n = 0
        for m in messages:
            framed = framed_size(len(m))
            if self._size + framed + line > self.batch_size:
                await self._seal()
            self._parts.append(m)
            self._size += framed
            n += 1
        await self._seal()
        return n

    async def flush(self) -> None:
        """Return once every queued batch is acknowledged (through failovers)."""
        await self._seal()
        while self._unacked:
            await self._step()

    # ------------------------------------------------------------ internals

    async def _seal(self) -> None:
        if not self._parts:
            return
        self._unacked.append((encode_batch(self.topic, build_body(self._parts), len(self._parts)), len(self._parts)))
        self._parts, self._size = [], 0
        while self._in_flight < len(self._unacked):  # every batch sent (a full window waits for a reply)
            await self._step()

    async def _step(self) -> None:
        """Send what the window allows, or read one reply; a failure moves to the leader and resends."""
        try:
            conn = self._conn or await self._connect()
            if self._in_flight < min(self.window, len(self._unacked)):
                request, _ = self._unacked[self._in_flight]
                with anyio.fail_after(self.timeout):
                    await conn.send(request)
                self._in_flight += 1
                return
            with anyio.fail_after(self.timeout):
                reply = await conn.receive(ReplyKind.OFFSET)
        except TLSTimeout as exc:  # a node that does not answer, as below
            await self._failover(str(exc))
            return
        except TLSFailed:  # a refused certificate: final, as the module docstring says
            await self._drop()
            raise
        except (NotAllowed, Unsupported) as exc:  # AUTH refused: final
            lost = self.pending_messages
            await self._drop()
            raise WriteFailed(f"{lost} message(s) not acknowledged: {exc}", []) from exc
        except (ConnectionLost, BadReply, TimeoutError, OSError) as exc:
            await self._failover(str(exc) or type(exc).__name__)
            return
        if isinstance(reply, OffsetReply):
            self._failing_since, self._backoff, self._attempts = None, 0.0, 0
            _, count = self._unacked.popleft()
            self._in_flight -= 1
            self.acked_messages += count
            self.acked_batches += 1
            if self.on_ack is not None:
                self.on_ack(reply.offset, count)
            return
        reason = reply.reason if isinstance(reply, ErrorReply) else f"unexpected reply {reply!r}"
        if not retriable(reason):
            lost = self.pending_messages
            await self._drop()
            raise WriteFailed(f"{lost} message(s) not acknowledged: ERR {reason}", [])
        await self._failover(reason, _redirect(reason))

    async def _failover(self, why: str, hint: str | None = None) -> None:
        """Drop the connection; resend after a backoff, for at most ``give_up`` since the first failure
        (only an OK resets it), then raise :class:`Timeout` saying how many messages are unacknowledged."""
        now = anyio.current_time()
        if self._failing_since is None:
            self._failing_since = now
        self.failovers += 1
        self.resent_batches += self._in_flight
        await self._drop()
        self._in_flight = 0
        self.leader = hint
        self._why = why
        left = self._failing_since + self.give_up - now
        if left <= 0:
            raise self._gave_up(why)
        await anyio.sleep(min(self._backoff, left))
        self._backoff = min(max(self._backoff * 2, 0.05), 1.0)
        self._attempts += 1

    def _gave_up(self, why: str) -> Timeout:
        return Timeout(f"no leader accepted writes within {self.give_up:g} s ({self._attempts} attempts, "
                       f"last: {why}); {self.pending_messages} message(s) not acknowledged")

    async def _connect(self) -> Connection:
        deadline = (self._failing_since or anyio.current_time()) + self.give_up
        delay = 0.05
        why = self._why
        while True:
            address = self.leader or await find_leader(self.addresses, per_node=min(2.0, self.timeout),
                                                       secure=self.secure)
            if address is not None:
                try:
                    with anyio.fail_after(min(2.0, self.timeout)):
                        self._conn = await self.secure.connect(address)
                    self.leader = address
                    return self._conn
                except TLSTimeout as exc:
                    why = str(exc)
                except TLSFailed:
                    raise
                except (ConnectionLost, TimeoutError, OSError) as exc:
                    why = str(exc)
            self.leader = None
            if anyio.current_time() + delay > deadline:
                raise self._gave_up(why)
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.aclose()

