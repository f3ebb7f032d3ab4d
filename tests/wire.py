"""A minimal raw-protocol client for server tests (independent of the client library)."""

from __future__ import annotations

import trio

from logd_trio.core.framing import build_body, parse_frame_header
from logd_trio.core.requests import encode_batch


def batch_request(topic: str, msgs: list[bytes]) -> bytes:
    return encode_batch(topic, build_body(msgs), len(msgs))


class Wire:
    """Send raw requests; read replies by framing."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, host: str, port: int) -> Wire:
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def fill(self) -> None:
        """Wait for more bytes of the reply (kept for the next read)."""
        await self._fill()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buf += data

    async def line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            await self._fill()
        out = bytes(self.buf[: i + 2])
        del self.buf[: i + 2]
        return out

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def reply(self) -> bytes:
        """One whole reply: a line, plus frames for ``OK <off> <n>`` of a read, plus MOK bodies."""
        first = await self.line()
        if first.startswith(b"MOK "):
            n = int(first[4:-2])
            return first + await self.exactly(n + 2)
        return first

    async def read_reply(self) -> tuple[bytes, list[bytes]]:
        """Reply to READ/TAIL: (header line, frames)."""
        head = await self.line()
        if not head.startswith(b"OK "):
            return head, []
        n = int(head.split()[2])
        frames = []
        for _ in range(n):
            line = await self.line()
            hdr = parse_frame_header(line)
            assert hdr is not None
            frames.append(line + await self.exactly(hdr.size))
        return head, frames

    async def closed(self) -> bool:
        """True once the server has closed (EOF or reset)."""
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    return True
                self.buf += data
        except trio.BrokenResourceError:
            return True

    async def aclose(self) -> None:
        await self.stream.aclose()
