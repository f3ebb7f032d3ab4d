"""The streaming etcd watch, with a bounded reader.

The reader waits at most ``idle_timeout`` for the next message: a quiet, broken or
stuck stream is replaced by a new one from the next revision (on whichever endpoint
serves it: nothing missed, nothing twice).  When no endpoint serves a new stream
within ``timeout`` the watch raises EtcdUnavailable, so a stuck or dead etcd never
hangs its reader for longer than ``idle_timeout + timeout``.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType

import httpx
import trio

from logd_trio.server.cluster.etcd_wire import (
    CODE_UNAVAILABLE,
    EtcdBadReply,
    EtcdError,
    EtcdUnavailable,
    Header,
    Json,
    WatchCompacted,
    WatchEvent,
    b64,
    error_from_reply,
)
from logd_trio.server.cluster.transport import MAX_REPLY, Transport, as_obj, decode, describe, num

__all__ = ["Watch"]


class Watch:
    """A streaming watch with a bounded reader (see the module docstring)."""

    def __init__(self, transport: Transport, key: bytes, range_end: bytes, start_revision: int, prev_kv: bool,
                 idle_timeout: float, timeout: float) -> None:
        if not (idle_timeout > 0 and timeout > 0):
            raise ValueError("watch timeouts must be positive")
        self._transport = transport
        self._key = key
        self._range_end = range_end
        self._prev_kv = prev_kv
        self.idle_timeout = idle_timeout
        self.timeout = timeout
        self.next_revision = start_revision  # 0 until the first stream tells where "now" is
        self._events: deque[WatchEvent] = deque()
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._buf = bytearray()
        self.reconnects = 0

    async def __aenter__(self) -> Watch:
        try:
            await self._open()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._events:
            message = await self._next_message()
            if message is None:  # stream idle, broken or ended: a new one from where we are
                await self._close()
                self.reconnects += 1
                await self._open()
                continue
            self._handle(message)
        return self._events.popleft()

    def _handle(self, message: Json) -> None:
        if "error" in message:
            raise error_from_reply(as_obj(message["error"]))
        result = as_obj(message.get("result"))
        if result.get("canceled"):
            compacted = num(result.get("compact_revision"))
            if compacted:
                raise WatchCompacted(compacted)
            raise EtcdError(-1, f"watch canceled: {result.get('cancel_reason') or 'no reason given'}")
        events = [WatchEvent.from_json(e) for e in result.get("events") or []]
        revision = Header.from_json(result.get("header")).revision
        if events:
            self._events.extend(events)
            self.next_revision = events[-1].kv.mod_revision + 1
        elif result.get("created"):
            # Events from next_revision on follow; a watch "from now" starts after this revision.
            if not self.next_revision:
                self.next_revision = revision + 1
        else:  # a progress notification: a synced watch has sent everything up to here
            self.next_revision = max(self.next_revision, revision + 1)

    async def _open(self) -> None:
        client = self._transport
        body: Json = {"key": b64(self._key)}
        if self._range_end:
            body["range_end"] = b64(self._range_end)
        if self.next_revision:
            body["start_revision"] = str(self.next_revision)
        if self._prev_kv:
            body["prev_kv"] = True
        deadline = trio.current_time() + self.timeout
        n = len(client.endpoints)
        problems: list[str] = []
        attempt = -1
        while (remaining := deadline - trio.current_time()) > 0:
            attempt += 1
            index = (client.current + attempt) % n
            url = f"{client.endpoints[index]}/v3/watch"
            try:
                with trio.fail_after(remaining):
                    request = client.http.build_request(
                        "POST", url, json={"create_request": body},
                        timeout=client.httpx_timeout(remaining, read=self.idle_timeout))
                    self._response = await client.http.send(request, stream=True)
                    self._chunks = self._response.aiter_raw()
                    self._buf.clear()
                    first = await self._next_message(deadline)
                if first is None:
                    raise EtcdBadReply("stream ended before the watch was created")
                self._handle(first)
                result = as_obj(first.get("result"))
                if not result.get("created"):
                    raise EtcdBadReply(f"watch not created: {json.dumps(first)[:80]}")
                client.current = index
                return
            except (httpx.HTTPError, trio.TooSlowError, EtcdBadReply) as e:
                problems.append(f"{client.endpoints[index]}: {describe(e)}")
            except EtcdError as e:
                if e.code != CODE_UNAVAILABLE:
                    raise
                problems.append(f"{client.endpoints[index]}: {e.message}")
            await self._close()
            await client.pause_after_round(attempt + 1, deadline)
        raise EtcdUnavailable(f"etcd watch: no endpoint served a watch within {self.timeout:g}s "
                              f"({'; '.join(problems[-n:]) or 'no attempt fitted in the timeout'})")

    async def _next_message(self, deadline: float = math.inf) -> Json | None:
        """The next JSON line, or None if the stream is idle past the idle timeout,
        broken or ended (the caller replaces it)."""
        chunks = self._chunks
        if chunks is None:
            return None
        while True:
            limit = min(deadline, trio.current_time() + self.idle_timeout)
            while b"\n" not in self._buf:
                if len(self._buf) > MAX_REPLY:
                    raise EtcdBadReply(f"watch message over {MAX_REPLY} bytes")
                try:
                    with trio.fail_after(max(0.0, limit - trio.current_time())):
                        chunk = await chunks.__anext__()
                except (StopAsyncIteration, httpx.HTTPError, trio.TooSlowError):
                    return None
                self._buf += chunk
                limit = min(deadline, trio.current_time() + self.idle_timeout)
            line, _, rest = bytes(self._buf).partition(b"\n")
            self._buf[:] = rest
            if line.strip():
                return decode(line, "watch")

    async def _close(self) -> None:
        response, self._response, self._chunks = self._response, None, None
        if response is not None:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await response.aclose()


