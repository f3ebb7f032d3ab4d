"""The HTTP side of the etcd client: endpoints, failover between them, timeouts.

Every call is bounded by a timeout that covers all its attempts.  Calls go to the
current endpoint; every failed attempt (an error, no reply in time, or the caller
giving up on it) moves ``current`` past that endpoint, so a stalled member is not
asked again while others answer.  An idempotent call gives each endpoint a share
of its budget (budget / number of endpoints): a stalled member cannot eat it all.
A call marked idempotent (a read, a keepalive, a revoke) is retried on another endpoint whatever went wrong; a write
whose request may have reached etcd is not (it might have been applied): it raises
EtcdIndeterminate and the caller re-reads to find out.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from logd_trio.core.tls import describe as tls_describe
from logd_trio.server.cluster.etcd_wire import (
    CODE_UNAVAILABLE,
    EtcdBadReply,
    EtcdIndeterminate,
    EtcdUnavailable,
    Json,
    error_from_reply,
)

__all__ = ["MAX_REPLY", "Transport", "as_obj", "decode", "describe", "num", "parse_endpoints"]

MAX_REPLY = 4 << 20  # bytes; control data is small, a bigger reply is a wrong endpoint
# Sent as gRPC metadata: a member cut off from its raft leader refuses at once
# instead of serving a watch that will never see another event.
REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}


def parse_endpoints(text: str | Sequence[str]) -> list[str]:
    """``"http://a:2379,b:2379"`` (or a list) -> base URLs; a clear ValueError otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        url = item if "://" in item else f"http://{item}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"bad etcd endpoint {item!r}: expected http://HOST:PORT or https://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None:
            raise ValueError(f"bad etcd endpoint {item!r}: expected http://HOST:PORT")
        out.append(f"{parts.scheme}://{parts.netloc}")
    if not out:
        raise ValueError("no etcd endpoint given")
    return out



class Transport:
    """The endpoints, the one HTTP client, and which endpoint answered last."""

    def __init__(self, endpoints: str | Sequence[str], *, timeout: float, connect_timeout: float,
                 max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        if not (timeout > 0 and connect_timeout > 0):
            raise ValueError("etcd timeouts must be positive")
        if max_connections < 2:
            raise ValueError("etcd max_connections must be at least 2")
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.current = 0
        self.http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers=REQUIRE_LEADER, trust_env=False, verify=ssl_context if ssl_context is not None else True)

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.http.aclose()

    async def pause_after_round(self, attempt: int, deadline: float) -> None:
        """After every endpoint failed once more: back off a little (50 ms doubling, at most 0.5 s)."""
        n = len(self.endpoints)
        if attempt % n == 0:
            rounds = attempt // n
            await trio.sleep(min(0.05 * 2 ** (rounds - 1), 0.5, max(0.0, deadline - trio.current_time())))

    def httpx_timeout(self, remaining: float, read: float | None = None) -> httpx.Timeout:
        return httpx.Timeout(remaining if read is None else read, connect=min(self.connect_timeout, remaining),
                             pool=min(self.connect_timeout, remaining))

    async def _post(self, url: str, body: Json, limits: httpx.Timeout) -> tuple[int, Json]:
        """One request; the reply read up to MAX_REPLY bytes."""
        content = bytearray()
        async with self.http.stream("POST", url, json=body, timeout=limits) as reply:
            async for chunk in reply.aiter_raw():
                content += chunk
                if len(content) > MAX_REPLY:
                    raise EtcdBadReply(f"{url}: reply over {MAX_REPLY} bytes")
        return reply.status_code, decode(bytes(content), url)

    def failed(self, index: int) -> None:
        """An attempt on endpoint ``index`` failed: the next call starts on the next one
        (unless a concurrent call already moved on)."""
        if self.current == index:
            self.current = (index + 1) % len(self.endpoints)

    async def call(self, path: str, body: Json, *, idempotent: bool, budget: float | None = None) -> Json:
        """POST ``body`` to ``/v3/<path>``; the decoded reply.  Tries every endpoint,
        round after round, until one answers or ``budget`` seconds (the client's timeout
        by default) pass.  A read may retry the same member later (an attempt takes at
        most budget / endpoints); a write is sent at most once."""
        budget = self.timeout if budget is None else budget
        if budget <= 0:
            raise ValueError("etcd call budget must be positive")
        deadline = trio.current_time() + budget
        n = len(self.endpoints)
        share = budget / n
        problems: list[str] = []
        attempt = 0
        index = self.current
        while True:
            url = f"{self.endpoints[index]}/v3/{path}"
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            if idempotent:  # a member stuck (paused, or its raft leader just died) must not eat the whole budget
                remaining = min(remaining, share)
            ok = False
            try:
                with trio.fail_after(remaining):
                    status, data = await self._post(url, body, self.httpx_timeout(remaining))
                ok = "error" not in data and status < 400
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                problems.append(f"{self.endpoints[index]}: {describe(e)}")  # not sent: safe to retry
            except (httpx.HTTPError, trio.TooSlowError) as e:
                if not idempotent:
                    raise EtcdIndeterminate(f"etcd {path}: no reply from {self.endpoints[index]} "
                                            f"({describe(e)}): the write may have been applied") from e
                problems.append(f"{self.endpoints[index]}: {describe(e)}")
            else:
                if ok:
                    self.current = index
                    return data
                err = error_from_reply(data)
                if err.code != CODE_UNAVAILABLE:
                    ok = True  # the endpoint works: the error is the answer
                    raise err
                if not idempotent and "no leader" not in err.message:
                    raise EtcdIndeterminate(f"etcd {path}: {err.message}: the write may have been applied") from err
                problems.append(f"{self.endpoints[index]}: {err.message}")
            finally:
                if not ok:  # also when the caller gave up on this attempt (cancelled)
                    self.failed(index)
            attempt += 1
            index = (index + 1) % n
            await self.pause_after_round(attempt, deadline)
        last = "; ".join(problems[-n:]) or "no attempt fitted in the timeout"
        raise EtcdUnavailable(f"etcd {path}: no endpoint answered within {budget:g}s ({last})")


def num(value: object) -> int:
    """An int64 field of a reply (a decimal string); absent means 0."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EtcdBadReply(f"expected an integer, got {value!r:.60}")
    try:
        return int(value)
    except ValueError:
        raise EtcdBadReply(f"expected an integer, got {value!r:.60}") from None


def describe(e: BaseException) -> str:
    """One line: the error, or for a TLS failure (an https:// endpoint) why the handshake failed."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return f"TLS: {tls_describe(cause)}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def decode(content: bytes, url: str) -> Json:
    if len(content) > MAX_REPLY:
        raise EtcdBadReply(f"{url}: reply of {len(content)} bytes is too large")
    try:
        data = json.loads(content)
    except ValueError as e:
        raise EtcdBadReply(f"{url}: not an etcd v3 gateway reply: {content[:60]!r}") from e
    if not isinstance(data, dict):
        raise EtcdBadReply(f"{url}: not an etcd v3 gateway reply: {content[:60]!r}")
    return data


def as_obj(value: Any) -> Json:
    if not isinstance(value, dict):
        raise EtcdBadReply(f"expected an object, got {value!r:.60}")
    return value

