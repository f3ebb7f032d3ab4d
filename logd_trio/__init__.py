"""logd-trio: a fast, durable log transport on Trio that speaks Go logd's wire protocol.

The public API is re-exported here. Names are resolved on first use, so that
``import logd_trio.core`` (or a client-only program) does not pay for the server.

- ``logd_trio.core``: framing, requests, replies, addresses, durations, errors (pure, no trio)
- ``logd_trio.server``: the server (app, registry, connection, topic, storage, stats, config)
- ``logd_trio.client``: the client library (transport, client, writer, scanner, checkpoints)
- ``logd_trio.tools``: the benchmark engine behind ``logd bench``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from logd_trio._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "open_client": "logd_trio.client.client",
    "Client": "logd_trio.client.client",
    "RetryPolicy": "logd_trio.client.client",
    "Writer": "logd_trio.client.writer",
    "Scanner": "logd_trio.client.scanner",
    "Checkpoint": "logd_trio.client.checkpoint",
    "FileCheckpoint": "logd_trio.client.checkpoint",
    "MemoryCheckpoint": "logd_trio.client.checkpoint",
    "Position": "logd_trio.client.checkpoint",
    "Message": "logd_trio.core.replies",
    "LogdError": "logd_trio.core.errors",
    "serve": "logd_trio.server.app",
    "run": "logd_trio.server.app",
    "ServerConfig": "logd_trio.server.config",
    "load_config": "logd_trio.server.config",
}

__all__ = [
    "Checkpoint", "Client", "FileCheckpoint", "LogdError", "MemoryCheckpoint", "Message", "Position",
    "RetryPolicy", "Scanner", "ServerConfig", "Writer", "__version__", "load_config", "open_client",
    "run", "serve",
]

if TYPE_CHECKING:
    from logd_trio.client.checkpoint import Checkpoint, FileCheckpoint, MemoryCheckpoint, Position
    from logd_trio.client.client import Client, RetryPolicy, open_client
    from logd_trio.client.scanner import Scanner
    from logd_trio.client.writer import Writer
    from logd_trio.core.errors import LogdError
    from logd_trio.core.replies import Message
    from logd_trio.server.app import run, serve
    from logd_trio.server.config import ServerConfig, load_config


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'logd_trio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
