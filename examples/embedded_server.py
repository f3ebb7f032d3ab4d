"""Embed a logd-trio server in a Trio application.

Run:  python examples/embedded_server.py
The server listens on an ephemeral port on 127.0.0.1, the app writes a batch
to it over a plain socket, reads it back, and shuts the server down cleanly
(every acknowledged batch fsynced) by setting the shutdown event.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import trio

from logd_trio.batch import build_body
from logd_trio.config import ServerConfig
from logd_trio.protocol import encode_batch, encode_read
from logd_trio.server import serve


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(host="127.0.0.1:0", workdir=Path(tmp) / "logs")
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(partial(serve, config, shutdown=shutdown))
            print(f"server listening on {host}:{port}")
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(encode_batch("events", build_body([b"hello", b"world"]), 2))
                print("BATCH ->", (await stream.receive_some()).decode().strip())
                await stream.send_all(encode_read("events", 0, 10))
                print("READ  ->", (await stream.receive_some()).decode().replace("\r\n", "\\r\\n"))
            shutdown.set()  # graceful: stop accepting, drain, fsync, return
        print("server stopped")


if __name__ == "__main__":
    trio.run(main)
