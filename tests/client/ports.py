"""Addresses where nothing answers, without reusing a port that was bound and then closed
(another process may take such a port in between)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def refused_address() -> Iterator[str]:
    """``HOST:PORT`` whose port is held, for the block, by a socket that never listens:
    connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"
