"""The defaults that server, client, CLI and bench share (one place each)."""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_MAX_REPLY",
    "DEFAULT_PORT",
]

#: The port Go logd and logd-trio listen on.
DEFAULT_PORT: Final = 1774
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_ADDRESS: Final = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
#: Largest BATCH request (line + body) a server accepts unless configured otherwise.
DEFAULT_MAX_BATCH_SIZE: Final = 65536
#: Most messages one READ/TAIL may ask for unless configured otherwise.
DEFAULT_MAX_MESSAGES: Final = 50000
#: Largest READ/TAIL reply a client buffers.
DEFAULT_MAX_REPLY: Final = 256 * 1024 * 1024
