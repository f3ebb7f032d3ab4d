"""An application that logs through a Writer.

    logd serve &            # or any logd server (Go logd works too)
    python examples/write_app.py [HOST:PORT]

Writes 10,000 events to the topic "app-events" in batches (size- and
time-based), with several batches in flight; leaving the block flushes.
"""

from __future__ import annotations

import json
import sys

import trio

from logd_trio import open_client


async def main(address: str) -> None:
    async with open_client(address) as client:
        acked: list[int] = []
        async with client.writer("app-events", flush_interval=0.2, on_ack=lambda off, n: acked.append(n)) as w:
            for i in range(10_000):
                event = {"event": "page_view", "user": i % 97, "seq": i}
                await w.write(json.dumps(event).encode())
        # leaving the block flushed everything and raised if any batch failed
        print(f"wrote {sum(acked)} events in {len(acked)} batches; last batch at offset {w.last_offset}")


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:1774")
