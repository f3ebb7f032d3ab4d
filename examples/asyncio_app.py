"""The client under asyncio: a producer that waits for receipts, and a checkpointed consumer.

    logd serve &
    python examples/asyncio_app.py [HOST:PORT]          # asyncio.run
    python examples/asyncio_app.py [HOST:PORT] --trio   # the same code under trio.run

The producer writes 1,000 orders (fire-and-batch), then one "end" marker whose
acknowledgement it awaits to learn its position.  The consumer reads from its
checkpoint (at-least-once) to that marker and commits as it goes: run it
twice and the second run only sees what was written in between.
"""

from __future__ import annotations

import asyncio
import json
import sys

from logd_trio import FileCheckpoint, open_client


async def produce(address: str) -> tuple[int, int]:
    async with open_client(address) as client, client.writer("orders") as w:
        for i in range(1000):
            await w.write(json.dumps({"order": i, "amount": i % 50}).encode())
        ack = await w.send_and_wait(b'{"end": true}')  # acknowledged: stored, with its position
        return ack.offset, ack.delta


async def consume(address: str, end: tuple[int, int]) -> int:
    total = 0
    async with open_client(address) as client, client.scanner(
        "orders", checkpoint=FileCheckpoint("orders.checkpoint.json")
    ) as scanner:
        async for msg in scanner:
            event = json.loads(msg.body)
            total += event.get("amount", 0)
            if (msg.offset, msg.delta) == end:
                break
    return total


async def main(address: str) -> None:
    end = await produce(address)
    total = await consume(address, end)
    print(f"end marker at {end[0]}:{end[1]}; amounts since the last run: {total}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    address = args[0] if args else "127.0.0.1:1774"
    if "--trio" in sys.argv:
        import trio

        trio.run(main, address)
    else:
        asyncio.run(main(address))
