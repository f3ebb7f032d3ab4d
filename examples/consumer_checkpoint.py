"""A consumer that resumes where it stopped, thanks to a file checkpoint.

    python examples/consumer_checkpoint.py [HOST:PORT]

Run it twice: the second run only prints events written after the first
stopped.  Delivery is at-least-once: if processing crashes, the message being
processed (and any after the last commit) is delivered again next time.
Add --follow to keep waiting for new events.
"""

from __future__ import annotations

import sys

import trio

from logd_trio import FileCheckpoint, open_client


async def main(address: str, follow: bool) -> None:
    checkpoint = FileCheckpoint("consumer.checkpoint.json")
    async with open_client(address) as client, client.scanner(
        "app-events", checkpoint=checkpoint, follow=follow
    ) as scanner:
        async for msg in scanner:
            # process the message; the position after it is committed once we ask for the next one
            print(f"{msg.offset}:{msg.delta} {msg.body.decode(errors='replace')}")
        print(f"done; {scanner.count} messages, resume position {scanner.position}", file=sys.stderr)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--follow"]
    trio.run(main, args[0] if args else "127.0.0.1:1774", "--follow" in sys.argv)
