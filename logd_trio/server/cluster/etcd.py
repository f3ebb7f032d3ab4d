"""A small etcd v3 client over the JSON gateway, with httpx under Trio.

The typed surface: kv (range, get, get_prefix, put, delete), txn (Compare, Get,
Put, Delete), leases (grant, keepalive, revoke, ttl), a streaming watch, and the
errors of etcd_wire.  Every call is bounded by a timeout covering all its attempts
on all endpoints (see transport.py for the failover rules, watch.py for the
bounded reader).
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from logd_trio.server.cluster.etcd_wire import (
    Bytes,
    Compare,
    DeleteResult,
    EtcdBadReply,
    Get,
    Json,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    PutResult,
    RangeResult,
    TxnResult,
    as_bytes,
    b64,
    prefix_end,
    txn_body,
)
from logd_trio.server.cluster.transport import Transport, num, parse_endpoints
from logd_trio.server.cluster.watch import Watch

__all__ = ["EtcdClient", "Lease", "Watch", "parse_endpoints"]


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int  # seconds, as granted


class EtcdClient:
    """Use as ``async with EtcdClient(endpoints) as etcd:``."""

    def __init__(self, endpoints: str | Sequence[str], *, timeout: float = 2.0,
                 connect_timeout: float = 0.5, max_connections: int = 16,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: how https:// endpoints are checked (and which client certificate is
        presented); None: the system's trust store."""
        self.transport = Transport(endpoints, timeout=timeout, connect_timeout=connect_timeout,
                                   max_connections=max_connections, ssl_context=ssl_context)

    @property
    def endpoints(self) -> list[str]:
        return self.transport.endpoints

    @property
    def timeout(self) -> float:
        return self.transport.timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()

    @property
    def endpoint(self) -> str:
        """The endpoint that answered last (the next call tries it first)."""
        return self.transport.endpoints[self.transport.current]

    async def call(self, path: str, body: Json, *, idempotent: bool, budget: float | None = None) -> Json:
        """POST ``body`` to ``/v3/<path>``; the decoded reply (or a typed error).
        ``budget`` (seconds) overrides the client's timeout for this call."""
        return await self.transport.call(path, body, idempotent=idempotent, budget=budget)

    # ------------------------------------------------------------ kv

    async def range(self, key: Bytes, *, prefix: bool = False, limit: int = 0, revision: int = 0) -> RangeResult:
        body: Json = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        return RangeResult.from_json(await self.call("kv/range", body, idempotent=True))

    async def get(self, key: Bytes) -> KeyValue | None:
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def get_prefix(self, prefix: Bytes) -> RangeResult:
        return await self.range(prefix, prefix=True)

    async def put(self, key: Bytes, value: Bytes, *, lease: int = 0, prev_kv: bool = False) -> PutResult:
        body = Put(key, value, lease, prev_kv).to_json()
        return PutResult.from_json(await self.call("kv/put", body, idempotent=False))

    async def delete(self, key: Bytes, *, prefix: bool = False, prev_kv: bool = False) -> DeleteResult:
        body: Json = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        if prev_kv:
            body["prev_kv"] = True
        return DeleteResult.from_json(await self.call("kv/deleterange", body, idempotent=False))

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """If every compare holds run ``success``, else ``failure``; atomically."""
        writes = any(not _is_read(op) for op in (*success, *failure))
        data = await self.call("kv/txn", txn_body(compare, success, failure), idempotent=not writes)
        return TxnResult.from_json(data)

    # ------------------------------------------------------------ leases

    async def lease_grant(self, ttl: int) -> Lease:
        if ttl < 1:
            raise ValueError(f"lease TTL must be at least 1 s, got {ttl}")
        data = await self.call("lease/grant", {"TTL": str(ttl)}, idempotent=False)
        return Lease(num(data.get("ID")), num(data.get("TTL")))

    async def lease_keepalive(self, lease_id: int, *, budget: float | None = None) -> int:
        """Renew once; the TTL granted from now.  LeaseNotFound once it expired.
        ``budget`` (seconds) bounds all attempts (each endpoint gets its share of it)."""
        data = await self.call("lease/keepalive", {"ID": str(lease_id)}, idempotent=True, budget=budget)
        result = data.get("result")
        if not isinstance(result, dict):
            raise EtcdBadReply(f"lease keepalive: no result in {json.dumps(data)[:80]}")
        ttl = num(result.get("TTL"))
        if ttl <= 0:
            raise LeaseNotFound(5, f"lease {lease_id:x} not found (expired or revoked)")
        return ttl

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke, deleting its keys; a lease already gone is not an error."""
        with contextlib.suppress(LeaseNotFound):
            await self.call("lease/revoke", {"ID": str(lease_id)}, idempotent=True)

    async def lease_ttl(self, lease_id: int) -> int | None:
        """Seconds left on the lease, or None if it no longer exists."""
        data = await self.call("lease/timetolive", {"ID": str(lease_id)}, idempotent=True)
        ttl = num(data.get("TTL"))
        return None if ttl < 0 else ttl

    async def status(self) -> Json:
        """The answering member's status (version, leader, raft term...)."""
        return await self.call("maintenance/status", {}, idempotent=True)

    # ------------------------------------------------------------ watch

    def watch(self, key: Bytes, *, prefix: bool = False, start_revision: int = 0, prev_kv: bool = False,
              idle_timeout: float = 5.0) -> Watch:
        """A watch on ``key`` (or every key under it); use as ``async with``.  Events
        from ``start_revision`` on (0: from now)."""
        return Watch(self.transport, as_bytes(key), prefix_end(key) if prefix else b"", start_revision, prev_kv,
                     idle_timeout, self.timeout)


def _is_read(op: Op) -> bool:
    return isinstance(op, Get)


