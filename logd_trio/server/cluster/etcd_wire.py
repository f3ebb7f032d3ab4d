"""etcd v3 JSON gateway encoding: keys, values, compares, ops, replies, errors.

Pure (no I/O, no Trio).  The gateway speaks the gRPC messages as JSON: keys and
values are base64, int64 fields are decimal strings, and a field at its default
value is omitted (a failed txn has no ``succeeded``, an empty range no ``kvs``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Compare", "Delete", "DeleteResult", "EtcdBadReply", "EtcdError", "EtcdException",
    "EtcdIndeterminate", "EtcdUnavailable", "Get", "Header", "KeyValue", "LeaseNotFound",
    "Op", "Put", "PutResult", "RangeResult", "TxnResult", "WatchCompacted", "WatchEvent",
    "as_bytes", "b64", "error_from_reply", "prefix_end",
]

Json = dict[str, Any]
Bytes = bytes | str

# gRPC status codes the client treats specially.
CODE_NOT_FOUND = 5
CODE_UNAVAILABLE = 14


# ---------------------------------------------------------------- errors

class EtcdException(Exception):
    """Base of every error of the etcd client."""


class EtcdUnavailable(EtcdException):
    """No endpoint answered within the timeout; nothing is known to have happened."""


class EtcdIndeterminate(EtcdUnavailable):
    """A write was sent but its reply was lost: it may or may not have been applied."""


class EtcdError(EtcdException):
    """etcd answered with an error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


class LeaseNotFound(EtcdError):
    """The lease expired or was revoked."""


class WatchCompacted(EtcdError):
    """The watch asked for revisions etcd has already compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(-1, f"watch start revision compacted (oldest is {compact_revision})")
        self.compact_revision = compact_revision


class EtcdBadReply(EtcdError):
    """The reply is not what the etcd v3 JSON gateway sends (wrong endpoint, or a bug)."""

    def __init__(self, message: str) -> None:
        super().__init__(-1, message)


def error_from_reply(data: Mapping[str, Any]) -> EtcdError:
    code = _int(data.get("code", -1))
    message = str(data.get("message") or data.get("error") or "unknown error")
    if code == CODE_NOT_FOUND and "lease not found" in message:
        return LeaseNotFound(code, message)
    return EtcdError(code, message)


# ---------------------------------------------------------------- scalars

def as_bytes(data: Bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def b64(data: Bytes) -> str:
    return base64.b64encode(as_bytes(data)).decode("ascii")


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise EtcdBadReply(f"expected a base64 string, got {text!r:.60}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EtcdBadReply(f"bad base64 in reply: {text!r:.60}") from e


def _int(value: object) -> int:
    """An int64 field: a decimal string (or a number); absent means 0."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EtcdBadReply(f"expected an integer, got {value!r:.60}")
    try:
        return int(value)
    except ValueError as e:
        raise EtcdBadReply(f"expected an integer, got {value!r:.60}") from e


def _obj(value: object, what: str) -> Json:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EtcdBadReply(f"{what}: expected an object, got {value!r:.60}")
    return value


def _list(value: object, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise EtcdBadReply(f"{what}: expected a list, got {value!r:.60}")
    return value


def prefix_end(prefix: Bytes) -> bytes:
    """The range end that selects every key starting with ``prefix``."""
    p = bytearray(as_bytes(prefix))
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"  # every key
    p[-1] += 1
    return bytes(p)


# ---------------------------------------------------------------- replies

@dataclass(frozen=True, slots=True)
class Header:
    revision: int
    cluster_id: int
    member_id: int
    raft_term: int

    @classmethod
    def from_json(cls, data: object) -> Header:
        d = _obj(data, "header")
        return cls(_int(d.get("revision")), _int(d.get("cluster_id")), _int(d.get("member_id")),
                   _int(d.get("raft_term")))


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, data: object) -> KeyValue:
        d = _obj(data, "kv")
        return cls(unb64(d.get("key", "")), unb64(d.get("value", "")), _int(d.get("create_revision")),
                   _int(d.get("mod_revision")), _int(d.get("version")), _int(d.get("lease")))


@dataclass(frozen=True, slots=True)
class RangeResult:
    header: Header
    kvs: tuple[KeyValue, ...]
    count: int
    more: bool

    @classmethod
    def from_json(cls, data: object) -> RangeResult:
        d = _obj(data, "range")
        kvs = tuple(KeyValue.from_json(kv) for kv in _list(d.get("kvs"), "kvs"))
        return cls(Header.from_json(d.get("header")), kvs, _int(d.get("count")), bool(d.get("more")))


@dataclass(frozen=True, slots=True)
class PutResult:
    header: Header
    prev: KeyValue | None

    @classmethod
    def from_json(cls, data: object) -> PutResult:
        d = _obj(data, "put")
        prev = KeyValue.from_json(d["prev_kv"]) if d.get("prev_kv") else None
        return cls(Header.from_json(d.get("header")), prev)


@dataclass(frozen=True, slots=True)
class DeleteResult:
    header: Header
    deleted: int
    prev: tuple[KeyValue, ...]

    @classmethod
    def from_json(cls, data: object) -> DeleteResult:
        d = _obj(data, "delete")
        prev = tuple(KeyValue.from_json(kv) for kv in _list(d.get("prev_kvs"), "prev_kvs"))
        return cls(Header.from_json(d.get("header")), _int(d.get("deleted")), prev)


OpResult = RangeResult | PutResult | DeleteResult


@dataclass(frozen=True, slots=True)
class TxnResult:
    header: Header
    succeeded: bool
    responses: tuple[OpResult, ...]

    @classmethod
    def from_json(cls, data: object) -> TxnResult:
        d = _obj(data, "txn")
        out: list[OpResult] = []
        for r in _list(d.get("responses"), "responses"):
            r = _obj(r, "response")
            if "response_range" in r:
                out.append(RangeResult.from_json(r["response_range"]))
            elif "response_put" in r:
                out.append(PutResult.from_json(r["response_put"]))
            elif "response_delete_range" in r:
                out.append(DeleteResult.from_json(r["response_delete_range"]))
            else:
                raise EtcdBadReply(f"unknown txn response {sorted(r)!r:.80}")
        return cls(Header.from_json(d.get("header")), bool(d.get("succeeded")), tuple(out))


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev: KeyValue | None

    @classmethod
    def from_json(cls, data: object) -> WatchEvent:
        d = _obj(data, "event")
        kind = d.get("type", "PUT")
        if kind not in ("PUT", "DELETE"):
            raise EtcdBadReply(f"unknown watch event type {kind!r:.20}")
        prev = KeyValue.from_json(d["prev_kv"]) if d.get("prev_kv") else None
        return cls(kind, KeyValue.from_json(d.get("kv")), prev)


# ---------------------------------------------------------------- requests

@dataclass(frozen=True, slots=True)
class Compare:
    """One txn condition; build with the class methods."""

    key: bytes
    target: Literal["CREATE", "MOD", "VERSION", "VALUE", "LEASE"]
    result: Literal["EQUAL", "NOT_EQUAL", "GREATER", "LESS"]
    operand: int | bytes

    @classmethod
    def create_revision(cls, key: Bytes, revision: int, result: str = "EQUAL") -> Compare:
        """``CREATE(key) <result> revision``; a missing key has create revision 0."""
        return cls(as_bytes(key), "CREATE", _result(result), revision)

    @classmethod
    def mod_revision(cls, key: Bytes, revision: int, result: str = "EQUAL") -> Compare:
        """``MOD(key) <result> revision``; a missing key has mod revision 0."""
        return cls(as_bytes(key), "MOD", _result(result), revision)

    @classmethod
    def value(cls, key: Bytes, value: Bytes, result: str = "EQUAL") -> Compare:
        return cls(as_bytes(key), "VALUE", _result(result), as_bytes(value))

    @classmethod
    def lease(cls, key: Bytes, lease_id: int, result: str = "EQUAL") -> Compare:
        return cls(as_bytes(key), "LEASE", _result(result), lease_id)

    def to_json(self) -> Json:
        field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version",
                 "VALUE": "value", "LEASE": "lease"}[self.target]
        operand = b64(self.operand) if isinstance(self.operand, bytes) else str(self.operand)
        return {"target": self.target, "result": self.result, "key": b64(self.key), field: operand}


def _result(result: str) -> Literal["EQUAL", "NOT_EQUAL", "GREATER", "LESS"]:
    names = {"==": "EQUAL", "!=": "NOT_EQUAL", ">": "GREATER", "<": "LESS"}
    r = names.get(result, result)
    if r == "EQUAL":
        return "EQUAL"
    if r == "NOT_EQUAL":
        return "NOT_EQUAL"
    if r == "GREATER":
        return "GREATER"
    if r == "LESS":
        return "LESS"
    raise ValueError(f"bad compare result {result!r}: use ==, !=, > or <")


@dataclass(frozen=True, slots=True)
class Get:
    key: Bytes
    prefix: bool = False
    limit: int = 0

    def to_json(self) -> Json:
        body: Json = {"key": b64(self.key)}
        if self.prefix:
            body["range_end"] = b64(prefix_end(self.key))
        if self.limit:
            body["limit"] = str(self.limit)
        return body


@dataclass(frozen=True, slots=True)
class Put:
    key: Bytes
    value: Bytes
    lease: int = 0
    prev_kv: bool = False

    def to_json(self) -> Json:
        body: Json = {"key": b64(self.key), "value": b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        if self.prev_kv:
            body["prev_kv"] = True
        return body


@dataclass(frozen=True, slots=True)
class Delete:
    key: Bytes
    prefix: bool = False
    prev_kv: bool = False

    def to_json(self) -> Json:
        body: Json = {"key": b64(self.key)}
        if self.prefix:
            body["range_end"] = b64(prefix_end(self.key))
        if self.prev_kv:
            body["prev_kv"] = True
        return body


Op = Get | Put | Delete


def op_to_json(op: Op) -> Json:
    if isinstance(op, Get):
        return {"request_range": op.to_json()}
    if isinstance(op, Put):
        return {"request_put": op.to_json()}
    return {"request_delete_range": op.to_json()}


def txn_body(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> Json:
    return {"compare": [c.to_json() for c in compare], "success": [op_to_json(o) for o in success],
            "failure": [op_to_json(o) for o in failure]}
