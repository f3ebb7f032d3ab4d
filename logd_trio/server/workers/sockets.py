"""Listening sockets that several processes share (``SO_REUSEPORT``: the kernel spreads the
connections over them), and the config a worker process gets from its owner."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Any, Final

import trio

from logd_trio.server.config import ServerConfig

__all__ = ["config_from_json", "config_to_json", "reuseport_listeners"]

BACKLOG: Final = 4096


async def reuseport_listeners(host: str, port: int, *, first: bool = False) -> list[trio.SocketListener]:
    """Listeners on every address of ``host`` (as ``trio.open_tcp_listeners``), each with
    ``SO_REUSEPORT``; port 0: the first bound address's port for all.

    ``first`` (the owner): each address is first bound without ``SO_REUSEPORT``, which fails
    ("Address already in use") when anything holds the port, another server of these too: else
    the kernel would spread the clients over both servers."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, addr in infos:
            if first and port != 0:
                await _probe(family, kind, proto, addr)
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if listeners and port == 0:
                    addr = (addr[0], listeners[0].socket.getsockname()[1], *addr[2:])
                await sock.bind(addr)
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def _probe(family: int, kind: int, proto: int, addr: Any) -> None:
    with trio.socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await probe.bind(addr)  # and closed: the listener binds next


def config_to_json(config: ServerConfig) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    out["workdir"] = str(config.workdir)
    out["topics_whitelist"] = list(config.topics_whitelist)
    return out


def config_from_json(data: dict[str, Any]) -> ServerConfig:
    data = dict(data)
    data["workdir"] = Path(data["workdir"])
    data["topics_whitelist"] = tuple(data["topics_whitelist"])
    return ServerConfig(**data)


def dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"
