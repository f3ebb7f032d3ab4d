"""The writer's ordering guarantees: flush waits for every earlier batch (not a running
maximum), ``failed`` stays in the order the batches were queued, resend keeps the order."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from logd_trio.client.client import Client, Connection, RetryPolicy, open_client
from logd_trio.core.errors import InvalidBatch, Timeout, WriteFailed
from logd_trio.core.framing import build_body, parse_frame_header

from .live import read_line, scripted_peer, wait_all_tasks_blocked
from .test_writer import read_all

pytestmark = pytest.mark.anyio

CONFIG = b"MaxBatchSize: 1000\r\n"
ONE_PER_BATCH = {"max_in_flight": 3, "batch_size": 64, "flush_interval": 0.0}  # 33-byte messages


def _msg(i: int) -> bytes:
    return b"m%d-" % i + b"x" * 20


async def _config_or_batch(stream: anyio.abc.SocketStream, buf: bytearray) -> bytes | None:
    """Answer CONFIG; return the next batch's body (None at the end of the stream)."""
    while (line := await read_line(stream, buf)) is not None:
        if line == b"CONFIG":
            await stream.send(b"MOK %d\r\n%s\r\n" % (len(CONFIG), CONFIG))
            continue
        size = int(line.split()[1])
        while len(buf) < size:
            buf += await stream.receive()
        body = bytes(buf[:size])
        del buf[:size]
        return body
    return None


async def test_flush_waits_for_batches_in_flight_after_a_permanent_error(tg: anyio.abc.TaskGroup) -> None:
    """b1 is refused while b2, b3 are in flight and b4..b6 queued: the queued ones fail at once,
    and flush used to return then, with b2 and b3 unanswered (and marked Timeout on exit
    although the server stored them)."""
    flushed = anyio.Event()

    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        for _ in range(3):
            if await _config_or_batch(stream, buf) is None:
                return  # the connection that only asked CONFIG
        await stream.send(b"ERR invalid batch\r\n")
        with anyio.move_on_after(0.3):  # a guard: the fixed writer's flush waits for the replies
            await flushed.wait()
        await stream.send(b"OK 100 1\r\nOK 200 1\r\n")
        while await _config_or_batch(stream, buf) is not None:
            pass

    addr = await scripted_peer(tg, peer)
    async with open_client(addr, retry=RetryPolicy(attempts=2, initial=0.01)) as c:
        with pytest.raises(WriteFailed) as on_exit:
            async with c.writer("t", **ONE_PER_BATCH) as w:  # type: ignore[arg-type]
                receipts = [await w.send(_msg(i)) for i in range(6)]
                with anyio.fail_after(10), pytest.raises(WriteFailed):
                    await w.flush()
                flushed.set()
                assert all(r.done for r in receipts)
                assert [r.offset for r in receipts[1:3]] == [100, 200]
        assert [b.last_seq for b in w.failed] == [1, 4, 5, 6]
        assert on_exit.value.failed == w.failed
        assert all(isinstance(b.error, InvalidBatch) for b in w.failed)
        assert not any(isinstance(b.error, Timeout) for b in w.failed)


async def test_failed_stays_in_queue_order(tg: anyio.abc.TaskGroup) -> None:
    """b1 refused, then the connection closes with b2, b3 unanswered: failed is b1..b6 in order
    (the in-flight ones used to land after the queued ones)."""
    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        for _ in range(3):
            if await _config_or_batch(stream, buf) is None:
                return  # the connection that only asked CONFIG
        await stream.send(b"ERR invalid batch\r\n")
        await wait_all_tasks_blocked()
        # returning closes the connection: b2 and b3 fail with ConnectionLost

    addr = await scripted_peer(tg, peer)
    async with open_client(addr, retry=RetryPolicy(attempts=1, initial=0.01)) as c:
        with anyio.fail_after(10), pytest.raises(WriteFailed):
            async with c.writer("t", **ONE_PER_BATCH) as w:  # type: ignore[arg-type]
                for i in range(6):
                    await w.write(_msg(i))
        assert [b.last_seq for b in w.failed] == [1, 2, 3, 4, 5, 6]
        assert not any(isinstance(b.error, Timeout) for b in w.failed)


async def test_resend_keeps_the_order(tg: anyio.abc.TaskGroup) -> None:
    """The first connection takes b1, b2 and closes unanswered while b3 waits for a slot:
    b3 used to go out before the re-sent b1 and b2."""
    stored: list[bytes] = []
    conns = [0]

    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        me: int | None = None
        got = 0
        while (body := await _config_or_batch(stream, buf)) is not None:
            if me is None:
                conns[0] += 1
                me = conns[0]
            got += 1
            if me == 1:
                if got == 2:
                    await wait_all_tasks_blocked()  # the sender waits for a slot by now
                    return  # close without answering either
                continue
            stored.append(body.split(b"\r\n")[1])
            await stream.send(b"OK %d 1\r\n" % len(stored))

    addr = await scripted_peer(tg, peer)
    async with open_client(addr, retry=RetryPolicy(attempts=3, initial=0.01)) as c:
        with anyio.fail_after(10):
            async with c.writer("t", resend=True, max_in_flight=2, batch_size=64, flush_interval=0) as w:
                for i in range(5):
                    await w.write(_msg(i))
                await w.flush()
    assert stored == [_msg(i) for i in range(5)]


async def test_batches_queued_together_go_in_one_send_within_max_in_flight(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dozen batches sealed at once, four slots: the sender writes the first four with one
    send, then each group that freed slots allows; every batch once, in order."""
    sends: list[bytes] = []
    original = Connection.send_many

    async def send_many(self: Connection, parts: list[bytes]) -> None:
        sends.append(b"".join(parts))
        await original(self, parts)

    monkeypatch.setattr(Connection, "send_many", send_many)
    msgs = [b"m%03d" % i + b"x" * 90 for i in range(100)]  # nine per batch of 1000 bytes
    async with client.writer("grouped", batch_size=1000, max_in_flight=4, flush_interval=None) as w:
        await w.write_many(msgs)
    frames = []
    per_send = []
    for data in sends:
        pos, count = 0, 0
        while pos < len(data):
            header = parse_frame_header(data, pos)
            assert header is not None
            frames.append(data[pos + header.header_len: pos + header.frame_len])
            pos += header.frame_len
            count += 1
        per_send.append(count)
    assert per_send[0] == 4 and max(per_send) <= 4  # never more than max_in_flight unanswered
    assert len(sends) < len(frames)
    assert b"".join(frames) == build_body(msgs)
    assert await read_all(client, "grouped") == msgs
