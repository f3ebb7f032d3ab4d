"""Embed a logd-trio server in a Trio application.

Run:  python examples/embedded_server.py

The server runs in the app's nursery on an ephemeral port of 127.0.0.1; the
app writes through the client library, reads the messages back, and then
shuts the server down gracefully (every acknowledged batch is fsynced) by
setting the shutdown event.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import trio

from logd_trio import ServerConfig, open_client, serve


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(host="127.0.0.1:0", workdir=Path(tmp) / "logs")
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(partial(serve, config, shutdown=shutdown))
            print(f"server listening on {host}:{port}")
            async with open_client(f"{host}:{port}") as client:
                offset = await client.batch("events", [b"hello", b"world"])
                print(f"wrote 2 messages at offset {offset}")
                async with client.scanner("events", offset=offset) as scanner:
                    async for msg in scanner:
                        print(f"read {msg.body!r} (offset {msg.offset}, delta {msg.delta})")
            shutdown.set()  # graceful: stop accepting, answer in-flight requests, fsync, return
        print("server stopped")


if __name__ == "__main__":
    trio.run(main)
