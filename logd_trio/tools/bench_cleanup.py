"""``logd bench`` cleans up after itself: the bench topics it created are deleted at the end.

Only topics that did not exist before the run are deleted (a topic an earlier
``--keep`` run left, or one that happens to carry the prefix, is left alone).
Raw requests over one trio socket, like the rest of the bench engine.  Against
a server without the TOPICS/DELETE extensions (Go logd) nothing is deleted.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from logd_trio.core.requests import encode_delete
from logd_trio.tools.bench_phases import BenchError, connect, send_all

__all__ = ["delete_topics", "existing_topics"]

TIMEOUT = 30.0  # for each cleanup step: a deletion fsyncs and unlinks


async def _replies(sock: trio.socket.SocketType, n: int) -> list[bytes]:
    """The next ``n`` reply lines (MOK bodies included in their line's entry)."""
    data, out = b"", list[bytes]()
    while len(out) < n:
        line, sep, rest = data.partition(b"\r\n")
        if sep and line.startswith(b"MOK ") and line[4:].isdigit():
            size = int(line[4:])
            if len(rest) >= size + 2:
                out.append(line + b"\r\n" + rest[:size])
                data = rest[size + 2:]
                continue
        elif sep:
            out.append(line)
            data = rest
            continue
        chunk = await sock.recv(65536)
        if not chunk:
            raise BenchError("server closed the connection")
        data += chunk
    return out


async def existing_topics(address: tuple[str, int]) -> set[str] | None:
    """The topics the server has now (TOPICS); None when it does not say (Go logd)."""
    with trio.fail_after(TIMEOUT):
        sock = await connect(address)
        with sock:
            await send_all(sock, b"TOPICS\r\n")
            (reply,) = await _replies(sock, 1)
    if not reply.startswith(b"MOK "):
        return None
    body = reply.partition(b"\r\n")[2]
    return {line.partition(b": ")[0].decode("ascii") for line in body.split(b"\r\n") if b": " in line}


async def delete_topics(address: tuple[str, int], names: Iterable[str]) -> list[str]:
    """DELETE each of ``names`` (pipelined); the ones deleted.  A refusal raises :class:`BenchError`."""
    todo = sorted(names)
    if not todo:
        return []
    with trio.fail_after(TIMEOUT * len(todo)):
        sock = await connect(address)
        with sock:
            await send_all(sock, b"".join(encode_delete(n) for n in todo))
            replies = await _replies(sock, len(todo))
    failed = [f"{n}: {r.decode('ascii', 'replace')}" for n, r in zip(todo, replies, strict=True)
              if r != b"OK" and r != b"ERR not found"]
    if failed:
        raise BenchError(f"could not delete the bench topics ({'; '.join(failed)}); pass --keep to leave them")
    return [n for n, r in zip(todo, replies, strict=True) if r == b"OK"]
