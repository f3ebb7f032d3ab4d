"""Who may do what: the ``--auth-file`` (TOML), one :class:`Guard` per connection, and the check
every request passes (``ERR not allowed`` when it fails, counted and logged, never the token).

::

    [anonymous]                    # a client that never authenticates (Go clients): here, public.* only
    read = ["public.*"]

    [principals.alice]
    token = "sha256:9f86d08..."    # `logd auth hash-token`: only the hash is stored
    read = ["*"]
    write = ["app.*"]

    [principals.node-b]
    subject = "CN=node-b"          # a client certificate (mutual TLS): its subject's attributes
    node = true                    # a replication peer: may FETCH the topics it may read
    read = ["*"]

Rights are lists of topic patterns (``*``, ``?``, ``[abc]``): ``read`` (READ, TAIL), ``write`` (BATCH),
``admin`` (topic management, and read and write too).  STATS and TOPICS need some right; CONFIG,
PING, CLOSE and AUTH are always allowed.  Tokens are compared as SHA-256 digests with
:func:`hmac.compare_digest`, against every principal (no early exit).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from logd_trio.core import requests as p
from logd_trio.server.config import ConfigError, read_toml
from logd_trio.server.limits import Throttled
from logd_trio.server.stats import Counters

__all__ = ["NOT_ALLOWED", "Guard", "Policy", "Principal", "check_request", "hash_token", "load_policy"]

log = logging.getLogger("logd_trio.server.auth")

NOT_ALLOWED: Final = p.reply_err("not allowed")
TOKEN_PREFIX: Final = "sha256:"
REPORT_EVERY: Final = 10.0  # seconds between two log lines about refusals
ANONYMOUS: Final = "anonymous"
_RIGHT_KEYS: Final = ("read", "write", "admin")
_ANONYMOUS_KEYS: Final = frozenset({"max_topics", *_RIGHT_KEYS})
_PRINCIPAL_KEYS: Final = frozenset({"token", "subject", "node", *_ANONYMOUS_KEYS})
# The right each request needs, by request class name (so extensions added elsewhere get theirs
# by name): "" always allowed, "any" some right on some topic, else that right on req.topic.
# A request not listed needs admin on its topic (or on every topic, if it names none).
_NEEDS: Final[Mapping[str, str]] = {
    "Batch": "write", "Read": "read", "Tail": "read", "Seek": "read", "Fetch": "fetch",
    "Stats": "any", "Topics": "any", "Config": "", "Ping": "", "Close": "", "Auth": "",
    "Cluster": "any", "Epochs": "fetch",  # a cluster's view (like STATS); a follower's reconciliation
}
_CACHE_MAX: Final = 4096  # (right, topic) decisions a connection remembers


def hash_token(token: str) -> str:
    """What an auth file stores for ``token``: ``sha256:<hex>``."""
    return TOKEN_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def _subject_pairs(text: str) -> frozenset[tuple[str, str]]:
    pairs = set()
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"expected KEY=VALUE pairs such as CN=node-b,O=Example, got {text!r}")
        pairs.add((key.strip(), value.strip()))
    return frozenset(pairs)


@dataclass(frozen=True)
class Principal:
    """A name and what it may do."""

    name: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()
    node: bool = False  # a replication peer (FETCH)
    token_digest: str = field(default="", repr=False)  # hex SHA-256 of the token; "": none
    subject: frozenset[tuple[str, str]] = frozenset()  # certificate subject attributes; empty: none
    max_topics: int | None = None  # topics it may create while the server runs; None: only --topics

    def summary(self) -> str:
        """``read public.*; write -`` for the start's log line."""
        parts = [f"{k} {' '.join(getattr(self, k))}" for k in _RIGHT_KEYS if getattr(self, k)]
        return "; ".join(parts) or "nothing but CONFIG, PING and AUTH"

    def may(self, right: str, topic: str) -> bool:
        if right == "any":
            return bool(self.read or self.write or self.admin)
        if right == "fetch":  # replication: a node, and what it may read
            return self.node and self.may("read", topic)
        patterns = self.admin + (self.read if right == "read" else self.write if right == "write" else ())
        return any(fnmatch.fnmatchcase(topic, pat) for pat in patterns)


def _patterns(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: expected a list of topic patterns such as [\"app.*\"], got {value!r}")
    return tuple(value)


def _principal(where: str, name: str, table: Any, *, anonymous: bool) -> Principal:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    allowed = _ANONYMOUS_KEYS if anonymous else _PRINCIPAL_KEYS
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    rights = {k: _patterns(f"{where}.{k}", table[k]) for k in _RIGHT_KEYS if k in table}
    digest = ""
    if "token" in table:
        token = table["token"]
        hexpart = token[len(TOKEN_PREFIX):] if isinstance(token, str) and token.startswith(TOKEN_PREFIX) else ""
        if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
            raise ConfigError(f"{where}.token: expected \"sha256:<64 hex digits>\" as `logd auth hash-token` "
                              "prints it (the token itself is never stored)")
        digest = hexpart
    subject: frozenset[tuple[str, str]] = frozenset()
    if "subject" in table:
        if not isinstance(table["subject"], str):
            raise ConfigError(f"{where}.subject: expected a string such as \"CN=node-b\"")
        try:
            subject = _subject_pairs(table["subject"])
        except ValueError as e:
            raise ConfigError(f"{where}.subject: {e}") from None
    node = table.get("node", False)
    if not isinstance(node, bool):
        raise ConfigError(f"{where}.node: expected true or false")
    if not anonymous and not digest and not subject:
        raise ConfigError(f"{where}: needs a token or a subject (how would a client be known as {name}?)")
    max_topics = table.get("max_topics")
    if max_topics is not None and (isinstance(max_topics, bool) or not isinstance(max_topics, int)
                                   or max_topics < 0):
        raise ConfigError(f"{where}.max_topics: expected a whole number >= 0, got {max_topics!r}")
    return Principal(name, node=node, token_digest=digest, subject=subject, max_topics=max_topics, **rights)


@dataclass
class Policy:
    """The parsed auth file: the anonymous rights and the principals, in file order."""

    anonymous: Principal
    principals: tuple[Principal, ...]
    source: str = ""
    report: Throttled = field(default_factory=lambda: Throttled(log, logging.WARNING, REPORT_EVERY), repr=False)

    def by_token(self, token: str) -> Principal | None:
        """The principal whose token this is; every stored digest is compared (constant time each)."""
        digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
        found: Principal | None = None
        for who in self.principals:
            if who.token_digest and hmac.compare_digest(digest, who.token_digest) and found is None:
                found = who
        return found

    def by_subject(self, subject: str) -> Principal:
        """The first principal whose subject attributes the certificate has; else anonymous."""
        if subject:
            try:
                have = _subject_pairs(subject)
            except ValueError:
                return self.anonymous
            for who in self.principals:
                if who.subject and who.subject <= have:
                    return who
        return self.anonymous

    def guard(self, address: str, subject: str, counters: Counters) -> Guard:
        return Guard(self, address, self.by_subject(subject), counters)


def load_policy(path: str) -> Policy:
    """Read and check an auth file; :class:`ConfigError` (one line, naming the file and key)."""
    where = f"auth file {path}"
    data = read_toml(path, where)
    unknown = sorted(set(data) - {ANONYMOUS, "principals"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: anonymous, principals)")
    anonymous = _principal(f"{where}: [anonymous]", ANONYMOUS, data.get(ANONYMOUS, {}), anonymous=True)
    tables = data.get("principals", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{where}: principals must be tables ([principals.NAME])")
    principals = tuple(_principal(f"{where}: [principals.{name}]", name, t, anonymous=False)
                       for name, t in tables.items())
    seen: dict[str, str] = {}
    for who in principals:
        if who.name == ANONYMOUS:
            raise ConfigError(f"{where}: [principals.anonymous]: use the top-level [anonymous] table")
        if who.token_digest:
            if who.token_digest in seen:
                raise ConfigError(f"{where}: [principals.{who.name}] has the token of [principals."
                                  f"{seen[who.token_digest]}] (give each principal its own)")
            seen[who.token_digest] = who.name
    return Policy(anonymous, principals, path)


class Guard:
    """One connection's principal, and the check each of its requests passes."""

    __slots__ = ("_cache", "address", "counters", "policy", "principal")

    def __init__(self, policy: Policy, address: str, principal: Principal, counters: Counters) -> None:
        self.policy = policy
        self.address = address
        self.principal = principal
        self.counters = counters
        self._cache: dict[tuple[str, str], bool] = {}

    def authenticate(self, token: str) -> bytes:
        """AUTH: become the token's principal (``OK``), or stay as before (``ERR not allowed``)."""
        who = self.policy.by_token(token)
        if who is None:
            self._refused("auth", "AUTH with a token the auth file does not know")
            return NOT_ALLOWED
        if who is not self.principal:
            log.debug("%s authenticated as %s", self.address, who.name)
            self.principal = who
            self._cache.clear()
        return p.REPLY_OK

    def refusal(self, req: p.Request) -> bytes | None:
        """``ERR not allowed`` if the principal may not make ``req``; None if it may."""
        name = type(req).__name__
        right = _NEEDS.get(name, "admin")
        if not right:
            return None
        topic = getattr(req, "topic", None)
        if topic is None and right != "any":
            topic, right = "*", "admin"
        key = (right, topic or "")
        allowed = self._cache.get(key)
        if allowed is None:
            allowed = self.principal.may(right, topic or "")
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = allowed
        if allowed:
            return None
        self._refused(name.lower(), f"{name.upper()}{' ' + topic if topic else ''} by {self.principal.name}")
        return NOT_ALLOWED

    def _refused(self, cmd: str, what: str) -> None:
        self.counters.errors[cmd] += 1
        self.counters.error_kinds["not_allowed"] += 1
        self.policy.report("refused %s from %s: not allowed", what, self.address)


def check_request(guard: Guard | None, req: p.Request) -> bytes | None:
    """The reply for ``req`` that the auth layer gives instead of the server: AUTH's own answer,
    or a refusal; None to serve it.  Without an auth file (``guard`` None) AUTH is answered OK."""
    if isinstance(req, p.Auth):
        return p.REPLY_OK if guard is None else guard.authenticate(req.token)
    return None if guard is None else guard.refusal(req)
