"""Writer against a real server: batching by size and time, pipelining,
backpressure, flush on exit, failures kept and retried, cancellation."""

from __future__ import annotations

import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

from logd_trio.client.client import Client, Connection, RetryPolicy, open_client
from logd_trio.client.writer import Writer
from logd_trio.core.errors import ConnectionLost, MessageTooLarge, Timeout, TopicNotAllowed, WriteFailed, WriterClosed
from logd_trio.core.framing import parse_frame_header
from logd_trio.core.replies import Message

from ..harness import FAST_RETRY
from .live import (
    LiveServer,
    elapsed_ok,
    new_server,
    read_body,
    read_line,
    receive_some,
    scripted_peer,
    virtual,
    virtual_or_scaled,
    virtual_time,
    wait_all_tasks_blocked,
)

pytestmark = pytest.mark.anyio




async def read_all(client: Client, topic: str) -> list[bytes]:
    out: list[bytes] = []
    async with client.scanner(topic) as s:
        async for m in s:
            out.append(m.body)
    return out


async def read_all_messages(client: Client, topic: str) -> list[Message]:
    async with client.scanner(topic) as s:
        return [m async for m in s]


async def test_batches_by_size_never_above_batch_size(client: Client) -> None:
    acks: list[tuple[int, int]] = []
    msgs = [b"m%04d" % i + b"x" * (i % 50) for i in range(300)]
    async with client.writer("size", batch_size=300, on_ack=lambda o, n: acks.append((o, n))) as w:
        for m in msgs:
            await w.write(m)
    assert sum(n for _, n in acks) == 300
    assert w.acked_messages == 300 and w.acked_batches == len(acks) > 10
    r = await client.read("size", 0, 50000)
    assert [b.offset for b in r.batches] == [o for o, _ in acks]
    assert all(b.frame_len <= 300 for b in r.batches)
    assert max(b.frame_len for b in r.batches) > 250  # batches are filled, not one message each
    assert [m.body for m in r] == msgs


@virtual_time()
async def test_batches_by_time(client: Client) -> None:
    acked_at: list[float] = []
    acked = [anyio.Event(), anyio.Event()]

    def on_ack(offset: int, n: int) -> None:
        acked_at.append(anyio.current_time())
        acked[len(acked_at) - 1].set()

    await client.batch("time", [b"create the topic"])  # its creation fsyncs: not in the timed part
    async with client.writer("time", flush_interval=0.4, on_ack=on_ack) as w:
        start = anyio.current_time()
        await w.write(b"one")
        await w.write(b"two")
        await anyio.sleep(0.39)
        assert acked_at == []
        await acked[0].wait()
        assert 0.4 <= acked_at[0] - start < 0.45
        assert w.acked_messages == 2 and w.acked_batches == 1
        # after the flush, a new message starts a new 0.4 s window
        t1 = anyio.current_time()
        await w.write(b"three")
        await acked[1].wait()
        assert 0.4 <= acked_at[1] - t1 < 0.45


async def test_flush_on_exit(client: Client) -> None:
    async with client.writer("exit", flush_interval=None) as w:
        for i in range(10):
            await w.write(b"%d" % i)
        assert w.acked_messages == 0
    assert w.acked_messages == 10
    assert await read_all(client, "exit") == [b"%d" % i for i in range(10)]


async def test_flush_waits_for_acks(client: Client) -> None:
    async with client.writer("flush", flush_interval=None) as w:
        await w.write(b"a")
        await w.flush()
        assert w.acked_messages == 1 and w.last_offset == 0
        assert w.pending_messages == 0


async def test_write_copies_its_input(client: Client) -> None:
    buf = bytearray(b"original")
    async with client.writer("copy") as w:
        await w.write(buf)
        buf[:] = b"changed!"
        await w.write_many([bytearray(b"x"), memoryview(b"y")])
    assert await read_all(client, "copy") == [b"original", b"x", b"y"]


@virtual_time()
async def test_pipelining_keeps_depth_batches_in_flight(
    tg: anyio.abc.TaskGroup
) -> None:
    """A peer that answers nothing until it holds 3 batches: only a pipelining writer
    gets through, and it never sends a 4th before an answer."""
    config = b"MaxBatchSize: 100\r\n"
    seen_before_reply: list[int] = []

    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        offset = 0
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(config), config))
                continue
            held = []
            while True:  # collect BATCH requests until 3 are held, or 1 s of silence
                size = int(line.split()[1])
                await read_body(stream, buf, size)
                held.append(len(line) + 2 + size)
                if len(held) == 3:
                    break
                with anyio.move_on_after(1):
                    got = await read_line(stream, buf)
                    if got is None:
                        return
                    line = got
                    continue
                break
            # nothing more may arrive while 3 are unanswered
            with anyio.move_on_after(1):
                more = await receive_some(stream)
                buf += more
            seen_before_reply.append(len(held) + (1 if buf else 0))
            for n in held:
                await stream.send(b"OK %d 1\r\n" % offset)
                offset += n

    addr = await scripted_peer(tg, peer)
    async with open_client(addr, retry=FAST_RETRY) as c, c.writer("p", max_in_flight=3, flush_interval=None) as w:
        for i in range(9):
            await w.write(b"%02d" % i + b"x" * 60)  # one message per 100-byte batch
    assert w.acked_batches == 9
    assert seen_before_reply[:3] == [3, 3, 3]


def _held_peer(config: bytes, release: anyio.Event) -> Callable[[anyio.abc.SocketStream], Awaitable[None]]:
    """A peer that answers CONFIG, then holds each batch's OK until ``release`` is set."""

    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        offset = 0
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(config), config))
                continue
            size = int(line.split()[1])
            await read_body(stream, buf, size)
            await release.wait()
            await stream.send(b"OK %d 1\r\n" % offset)
            offset += len(line) + 2 + size

    return peer


@virtual_or_scaled()
async def test_backpressure_bounds_the_queue(tg: anyio.abc.TaskGroup, unit: float) -> None:
    config = b"MaxBatchSize: 1000\r\n"
    release = anyio.Event()

    addr = await scripted_peer(tg, _held_peer(config, release))
    async with open_client(addr, retry=FAST_RETRY) as c, c.writer(
            "bp", max_in_flight=1, max_pending=3000, flush_interval=None) as w:
        queued = 0
        with anyio.move_on_after(5 * unit):
            while True:
                await w.write(b"x" * 100)
                queued += 1
        # blocked: about max_pending bytes queued beyond the one batch in flight
        assert 3000 <= w.pending_bytes < 3000 + 120
        assert 25 < queued < 45
        # the write that was cancelled while blocked did not queue its message
        assert w.pending_messages == queued
        release.set()
    assert w.acked_messages == queued


async def test_oversize_message_fails_alone(client: Client) -> None:
    async with client.writer("big") as w:
        await w.write(b"small")
        with pytest.raises(MessageTooLarge, match="does not fit"):
            await w.write(b"x" * 65536)
        with pytest.raises(MessageTooLarge):
            await w.write_many([b"ok", b"x" * 70000])
        # the largest message that fits exactly (request == max batch size) goes through
        overhead = len(b"BATCH 65495 big 1234567890 1\r\nMSG 65482\r\n\r\n")
        biggest = b"y" * (65536 - overhead)
        await w.write(biggest)
        await w.write(b"after")
    assert await read_all(client, "big") == [b"small", biggest, b"after"]


async def test_server_error_kept_and_reported_on_exit(
        tg: anyio.abc.TaskGroup, tmp_path: Path, anyio_backend_name: str) -> None:
    srv = new_server(anyio_backend_name, tg, tmp_path / "d", topics_whitelist=("ok",))
    await srv.start()
    async with open_client(srv.addr) as c:
        with pytest.raises(WriteFailed) as info:
            async with c.writer("nope") as w:
                await w.write(b"1")
                await w.write(b"2")
        assert isinstance(w.failed[0].error, TopicNotAllowed)
        assert list(w.failed[0].messages()) == [b"1", b"2"]
        assert info.value.failed == w.failed
        # clearing the failures accepts them: no error
        async with c.writer("nope") as w2:
            await w2.write(b"3")
            with pytest.raises(WriteFailed) as info:
                await w2.flush()
            assert isinstance(info.value.__cause__, TopicNotAllowed)
            assert len(w2.failed) == 1
            w2.failed.clear()
    await srv.stop()


async def test_permanent_error_stops_the_writer_at_once(
        tg: anyio.abc.TaskGroup, tmp_path: Path, anyio_backend_name: str) -> None:
    """After a refused topic, the writer takes no more messages and sends nothing more."""
    srv = new_server(anyio_backend_name, tg, tmp_path / "d", topics_whitelist=("ok",))
    await srv.start()
    async with open_client(srv.addr) as c:
        with pytest.raises(WriteFailed):
            async with c.writer("nope", flush_interval=None, batch_size=200) as w:
                await w.write(b"first")
                with pytest.raises(WriteFailed) as info:
                    await w.flush()
                assert isinstance(info.value.__cause__, TopicNotAllowed)
                with pytest.raises(WriteFailed, match="permanent error"):
                    await w.write(b"refused")
                with pytest.raises(WriteFailed, match="permanent error"):
                    await w.write_many([b"refused"] * 10)
                assert w.pending_messages == 0 and w.pending_bytes == 0
                with pytest.raises(WriteFailed, match="permanent error"):
                    await w.retry_failed()
        assert [m for b in w.failed for m in b.messages()] == [b"first"]
        requests = int((await c.stats()).get("requests.batch", "0") or 0)
    assert requests <= 1
    await srv.stop()


async def test_batches_queued_behind_a_permanent_error_fail_without_being_sent(
        tg: anyio.abc.TaskGroup) -> None:
    """A peer that refuses the first batch and counts the others it receives."""
    config = b"MaxBatchSize: 100\r\n"
    received: list[bytes] = []
    release = anyio.Event()

    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(config), config))
                continue
            size = int(line.split()[1])
            await read_body(stream, buf, size)
            received.append(line)
            await release.wait()
            await stream.send(b"ERR topic not allowed\r\n")

    addr = await scripted_peer(tg, peer)
    async with open_client(addr, retry=FAST_RETRY) as c:
        with pytest.raises(WriteFailed):
            async with c.writer("t", max_in_flight=1, flush_interval=None) as w:
                for i in range(10):
                    await w.write(b"%02d" % i + b"x" * 60)  # one message per 100-byte batch
                await wait_all_tasks_blocked()
                release.set()
                with pytest.raises(WriteFailed):
                    await w.flush()
    assert len(received) == 1  # the 9 batches behind the refused one were never sent
    assert len(w.failed) == 10 and all(isinstance(b.error, TopicNotAllowed) for b in w.failed)
    assert [m for b in w.failed for m in b.messages()] == [b"%02d" % i + b"x" * 60 for i in range(10)]


async def test_failed_batches_retry_after_restart_at_least_once(client: Client, server: LiveServer) -> None:
    async with client.writer("rs", flush_interval=None) as w:
        for i in range(5):
            await w.write(b"a%d" % i)
        await w.flush()
        await server.stop()
        for i in range(5):
            await w.write(b"b%d" % i)
        with pytest.raises(WriteFailed):
            await w.flush()
        assert len(w.failed) == 1 and isinstance(w.failed[0].error, ConnectionLost)
        assert list(w.failed[0].messages()) == [b"b%d" % i for i in range(5)]
        assert w.pending_messages == 0
        await server.start()
        await w.retry_failed()
        assert w.failed == []
        await w.write(b"c")
    assert await read_all(client, "rs") == [b"a%d" % i for i in range(5)] + [b"b%d" % i for i in range(5)] + [b"c"]


async def test_body_exception_propagates_unwrapped_after_flush(client: Client) -> None:
    with pytest.raises(ValueError, match="boom") as info:
        async with client.writer("exc", flush_interval=None) as w:
            await w.write(b"kept")
            raise ValueError("boom")
    assert not isinstance(info.value, BaseExceptionGroup)
    assert w.acked_messages == 1
    with pytest.raises(WriterClosed):
        await w.write(b"late")


@virtual_or_scaled()
async def test_cancel_while_flushing_on_exit_is_bounded(tg: anyio.abc.TaskGroup, unit: float) -> None:
    async def silent(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK 0\r\n\r\n")

    addr = await scripted_peer(tg, silent)
    async with open_client(addr, retry=FAST_RETRY) as c:
        start = anyio.current_time()
        with anyio.move_on_after(unit) as scope:
            async with c.writer("never", close_timeout=2 * unit) as w:
                await w.write(b"lost?")
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert elapsed_ok(anyio.current_time() - start, 3 * unit)
        assert len(w.failed) == 1 and w.failed[0].count == 1  # kept, not dropped


async def test_cancellation_at_each_await_point_of_write(tg: anyio.abc.TaskGroup
                                                         ) -> None:
    """Each wait of write / write_many / flush cancelled part-way through, for real."""
    release = anyio.Event()
    addr = await scripted_peer(tg, _held_peer(b"MaxBatchSize: 1000\r\n", release))
    async with open_client(addr, retry=FAST_RETRY) as c, c.writer(
            "cx", flush_interval=None, max_in_flight=1, max_pending=300) as w:
        # 1: already cancelled on entry -> not queued
        with anyio.CancelScope() as cs:
            cs.cancel()
            await w.write(b"never")
        assert w.pending_messages == 0
        # fill: one full batch in flight (held by the peer), then max_pending bytes queued
        await w.write_many([b"a" * 90] * 11)  # nine fit in a batch of 1000 bytes: it is sealed
        await wait_all_tasks_blocked()
        assert w.pending_bytes < 300  # the sealed batch was sent
        await w.write_many([b"b" * 90] * 2)
        queued = w.pending_messages
        assert w.pending_bytes >= 300 and queued == 13
        # 2: write blocked in the backpressure wait, cancelled there -> not queued
        async with anyio.create_task_group() as n:
            scope = anyio.CancelScope()
            done: list[str] = []

            async def blocked_write() -> None:
                with scope:
                    await w.write(b"cancelled")
                    done.append("queued")  # pragma: no cover

            n.start_soon(blocked_write)
            await wait_all_tasks_blocked()
            assert not done  # still waiting for room
            scope.cancel()
        assert scope.cancelled_caught and w.pending_messages == queued
        # 3: write_many blocked the same way -> none of its messages queued
        with anyio.move_on_after(0.05) as cs:
            await w.write_many([b"x", b"y"])
        assert cs.cancelled_caught and w.pending_messages == queued
        # 4: flush cancelled while waiting for the acknowledgements: the batches are still delivered
        with anyio.move_on_after(0.05) as cs:
            await w.flush()
        assert cs.cancelled_caught and w.acked_messages == 0
        release.set()
        await w.flush()
        assert w.acked_messages == queued and w.failed == []
    assert w.acked_messages == 13


def test_frame_header_helper_is_consistent() -> None:
    h = parse_frame_header(b"BATCH 10 t 1 1\r\n")
    assert h is not None and h.frame_len == 26


# ---------------------------------------------------------------- review 2


def _run_with_server(tmp_path: Path, body: Callable[[Client], Awaitable[None]]) -> None:
    """``trio.run`` a server and ``body(client)`` in one run of our own (not pytest-trio's), so
    that a SIGINT raised on purpose is delivered to a main task the test controls."""

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            srv = new_server("trio", tg, tmp_path / "d")
            await srv.start()
            async with open_client(srv.addr, retry=FAST_RETRY) as c:
                await body(c)
            tg.cancel_scope.cancel()

    try:
        trio.run(main)
    except KeyboardInterrupt:  # never let a stray Ctrl-C end the pytest session
        pytest.fail("KeyboardInterrupt escaped the test's own handling")


@pytest.mark.parametrize("where", ["sender", "receiver", "write_many"])
def test_ctrl_c_never_breaks_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """SIGINT while the writer's own code runs (its tasks, an on_ack, write_many) is raised in
    the caller at a checkpoint instead: the exit flush then stores everything, nothing fails."""
    fired: list[bool] = []

    def ctrl_c() -> None:
        if not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)  # the handler runs right here, in this frame

    if where == "sender":
        original = Connection.send_many

        async def send_many(self: Connection, parts: list[bytes]) -> None:
            if len(fired) == 0:
                ctrl_c()
            await original(self, parts)

        monkeypatch.setattr(Connection, "send_many", send_many)

    class Interrupting:
        def __bytes__(self) -> bytes:
            ctrl_c()
            return b"late"

    outcome: dict[str, Any] = {}

    async def body(c: Client) -> None:
        on_ack = (lambda o, n: ctrl_c()) if where == "receiver" else None
        queued: list[bytes] = []  # what write()/write_many() accepted
        try:
            async with c.writer("ki", batch_size=500, flush_interval=None, on_ack=on_ack) as w:
                first = [b"m%05d" % i for i in range(1500)]
                await w.write_many(first)
                queued += first
                if where == "write_many":
                    # the signal arrives inside write_many: it still queues all three, then
                    # Ctrl-C is raised at a later checkpoint
                    await w.write_many([b"x", Interrupting(), b"y"])  # type: ignore[list-item]
                    queued += [b"x", b"late", b"y"]
                for i in range(1500, 3000):
                    await w.write(b"m%05d" % i)
                    queued.append(b"m%05d" % i)
                await w.flush()
                await anyio.sleep(10)  # Ctrl-C arrives at a checkpoint before this ends
            outcome["no interrupt"] = True  # pragma: no cover
        except KeyboardInterrupt as exc:
            outcome["notes"] = getattr(exc, "__notes__", None)
        outcome["failed"] = list(w.failed)
        outcome["acked"] = w.acked_messages
        outcome["queued"] = len(queued)
        outcome["stored"] = await read_all(c, "ki") == queued

    _run_with_server(tmp_path, body)
    assert fired
    assert "no interrupt" not in outcome
    assert outcome["notes"] is None  # no "also raised: WriterClosed(...)"
    assert outcome["failed"] == []
    assert outcome["acked"] == outcome["queued"] >= 1500 + 3 * (where == "write_many")
    assert outcome["stored"]


async def test_on_ack_exception_does_not_stop_the_writer(client: Client) -> None:
    calls: list[int] = []

    def on_ack(offset: int, n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise OSError("stdout is gone")

    async with client.writer("cb", batch_size=200, flush_interval=None, on_ack=on_ack) as w:
        await w.write_many([b"a%03d" % i for i in range(100)])
        with pytest.raises(OSError, match="stdout is gone"):
            await w.flush()
        await w.write(b"after")
        await w.flush()  # raised once only
    assert w.failed == [] and w.acked_messages == 101
    assert sum(calls) == 101  # later batches were still acknowledged and reported
    assert await read_all(client, "cb") == [b"a%03d" % i for i in range(100)] + [b"after"]
    # an on_ack error not yet raised by flush() is raised when the block exits
    with pytest.raises(ValueError, match="late"):
        async with client.writer("cb", on_ack=lambda o, n: (_ for _ in ()).throw(ValueError("late"))) as w:
            await w.write(b"x")
    assert w.acked_messages == 1


@virtual_time()
async def test_oversize_after_a_sealed_batch_does_not_hang_flush(client: Client) -> None:
    await client.batch("huge", [b"first"])  # creating the topic fsyncs: not while time is virtual
    async with client.writer("huge", batch_size=100, flush_interval=None) as w:
        await w.write(b"x" * 50)
        await anyio.sleep(0.1)  # the sender goes back to waiting
        with pytest.raises(MessageTooLarge):
            await w.write(b"x" * 70)  # seals nothing: the message is refused first
        with anyio.fail_after(5):
            await w.flush()
        assert w.acked_messages == 1
        # batches sealed with nothing being built any more are still sent by flush(): a
        # message too big for the conservative limit seals the batch before it and goes alone
        await w.write(b"y" * 50)
        z = b"z" * 60  # 70 framed bytes: over the conservative 69, and the request fits in 100
        await w.write(z)
        with anyio.fail_after(5):
            await w.flush()
        assert w.acked_messages == 3
    assert await read_all(client, "huge") == [b"first", b"x" * 50, b"y" * 50, z]


@virtual_or_scaled()
async def test_ack_timeout_fails_unacknowledged_batches(tg: anyio.abc.TaskGroup, unit: float) -> None:
    """A peer that answers CONFIG and never acknowledges a batch (a stuck disk)."""
    config = b"MaxBatchSize: 65536\r\n"
    connections = []

    async def stuck(stream: anyio.abc.SocketStream) -> None:
        connections.append(stream)
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(config), config))

    addr = await scripted_peer(tg, stuck)
    async with open_client(addr, retry=FAST_RETRY) as c:
        start = anyio.current_time()
        with pytest.raises(WriteFailed) as info:
            async with c.writer("t", ack_timeout=2 * unit) as w:
                await w.write(b"one")
                with pytest.raises(WriteFailed):
                    await w.flush()
                assert elapsed_ok(anyio.current_time() - start, 2 * unit)
                assert len(w.failed) == 1 and isinstance(w.failed[0].error, Timeout)
                await w.write(b"two")  # a new connection, and again no answer
        assert elapsed_ok(anyio.current_time() - start, 4 * unit, 0.2)
        assert len(info.value.failed) == 2 and [b.count for b in w.failed] == [1, 1]
        assert all(isinstance(b.error, Timeout) for b in w.failed)
    with pytest.raises(ValueError):
        Writer(c, "t", ack_timeout=0)


@virtual_time()
async def test_ack_timeout_is_a_deadline_for_progress(client: Client) -> None:
    """A healthy server acknowledges well within ack_timeout: nothing fails, however long it runs."""
    async with client.writer("pace", ack_timeout=1.0, flush_interval=0.01) as w:
        for i in range(20):
            await w.write(b"%d" % i)
            await anyio.sleep(0.5)
    assert w.acked_messages == 20 and w.failed == []


@virtual_or_scaled()
async def test_failed_connect_fails_every_queued_batch_at_once(
    client: Client, server: LiveServer, unit: float
) -> None:
    """With the server gone, leaving the block costs one connect retry policy, not one per batch."""
    client.retry = RetryPolicy(attempts=3, initial=unit, maximum=unit)  # 2 units per connect
    await client.config()  # what the writer asks when it opens; it connects at its first batch
    await server.stop()
    with pytest.raises(WriteFailed) as info:
        async with client.writer("gone", batch_size=100, flush_interval=None) as w:
            start = anyio.current_time()
            await w.write_many([b"m%02d" % i + b"x" * 40 for i in range(20)])  # ~10 batches
    elapsed = anyio.current_time() - start
    assert len(info.value.failed) >= 10
    assert sum(b.count for b in w.failed) == 20
    assert all(isinstance(b.error, ConnectionLost) for b in w.failed)
    assert elapsed < (3 if virtual() else 8) * unit  # one policy (2 units); 10 policies took 20
    # they are kept in order, ready for retry_failed()
    assert [m for b in w.failed for m in b.messages()] == [b"m%02d" % i + b"x" * 40 for i in range(20)]


# ---------------------------------------------------------------- accounting, outages, receipts


async def test_pending_messages_counts_batches_being_retried(
        tg: anyio.abc.TaskGroup) -> None:
    """While retry_failed() re-sends, its messages are pending again (they are not acknowledged)."""
    release = anyio.Event()
    refuse = [True]
    config = b"MaxBatchSize: 1000\r\n"

    async def peer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while (line := await read_line(stream, buf)) is not None:
            if line == b"CONFIG":
                await stream.send(b"MOK %d\r\n%s\r\n" % (len(config), config))
                continue
            size = int(line.split()[1])
            await read_body(stream, buf, size)
            if refuse[0]:
                await stream.send(b"ERR storage error: disk full\r\n")  # not permanent
                continue
            await release.wait()
            await stream.send(b"OK 0 1\r\n")

    addr = await scripted_peer(tg, peer)
    async with open_client(addr, retry=FAST_RETRY) as c, c.writer("t", flush_interval=None) as w:
        await w.write_many([b"a", b"b", b"c"])
        with pytest.raises(WriteFailed):
            await w.flush()
        assert w.pending_messages == 0 and len(w.failed) == 1
        refuse[0] = False
        async with anyio.create_task_group() as n:
            n.start_soon(w.retry_failed)
            await wait_all_tasks_blocked()
            assert w.pending_messages == 3  # re-sent, not acknowledged yet
            await w.write(b"d")
            assert w.pending_messages == 4
            release.set()
        await w.flush()
        assert w.pending_messages == 0 and w.acked_messages == 4


async def test_failed_batches_count_against_max_pending(
        client: Client, server: LiveServer) -> None:
    """With the server down, failed batches do not pile up without bound: once they hold
    max_pending, write() refuses more instead of queueing."""
    client.retry = RetryPolicy(attempts=1)
    await client.config()  # what the writer asks when it opens
    await server.stop()
    accepted = 0
    with pytest.raises(WriteFailed) as info:
        async with client.writer("down", batch_size=200, flush_interval=0.01, max_pending=2000) as w:
            with pytest.raises(WriteFailed, match="hold max_pending"):
                for _ in range(20_000):
                    await w.write(b"m" * 50)
                    accepted += 1
            held = sum(len(b.request) for b in w.failed)
            assert 2000 <= held < 2000 + 2 * 200  # max_pending, plus what was queued when it filled
            assert accepted == sum(b.count for b in w.failed) < 60
            w.failed[:] = w.failed[-2:]  # accept the loss of the others: room again
            await w.write(b"again")
    assert info.value.failed == w.failed and all(isinstance(b.error, ConnectionLost) for b in w.failed)


async def test_send_and_wait_gives_each_message_its_position(client: Client) -> None:
    async with client.writer("rc", flush_interval=None, batch_size=200) as w:
        receipts = [await w.send(b"msg%02d" % i) for i in range(30)]
        ack = await w.send_and_wait(b"last")  # flushes what is queued before it
        acks = [await r for r in receipts]
    stored = {(m.offset, m.delta): m.body for m in await read_all_messages(client, "rc")}
    assert [stored[(a.offset, a.delta)] for a in acks] == [b"msg%02d" % i for i in range(30)]
    assert stored[(ack.offset, ack.delta)] == b"last"
    assert len({a.offset for a in acks}) > 2  # several batches


async def test_receipt_raises_the_batch_error(
        tg: anyio.abc.TaskGroup, tmp_path: Path, anyio_backend_name: str) -> None:
    srv = new_server(anyio_backend_name, tg, tmp_path / "d", topics_whitelist=("ok",))
    await srv.start()
    async with open_client(srv.addr) as c:
        with pytest.raises(WriteFailed):
            async with c.writer("nope") as w:
                with pytest.raises(TopicNotAllowed):
                    await w.send_and_wait(b"x")
    await srv.stop()


@virtual_or_scaled()
async def test_opening_a_writer_against_a_stalled_server_times_out(
        tg: anyio.abc.TaskGroup, unit: float) -> None:
    async def stalled(stream: anyio.abc.SocketStream) -> None:
        await anyio.sleep_forever()  # accepts, never answers

    addr = await scripted_peer(tg, stalled)
    async with open_client(addr, retry=FAST_RETRY) as c:
        start = anyio.current_time()
        with pytest.raises(Timeout, match="CONFIG"):
            async with c.writer("t", open_timeout=3 * unit):
                pass  # pragma: no cover
        assert elapsed_ok(anyio.current_time() - start, 3 * unit)


async def test_max_pending_below_the_batch_size_does_not_deadlock(client: Client) -> None:
    """Nothing sealed a batch still being built that filled max_pending alone: with no
    flush_interval the writer waited forever."""
    async with client.writer("bp", max_pending=4096, flush_interval=None) as w:
        with anyio.fail_after(10):
            for i in range(100):
                await w.write(b"%03d" % i + b"x" * 97)
            await w.flush()
        assert w.acked_messages == 100
    async with client.scanner("bp") as s:
        assert [m.body[:3] async for m in s] == [b"%03d" % i for i in range(100)]


async def test_a_black_holed_connect_is_a_failed_attempt() -> None:
    """A listener whose accept queue is full drops the SYNs: each connect attempt used to hang
    for the kernel's minutes of SYN retries, and flush with it."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):  # never accepted: the queue is full, later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        policy = RetryPolicy(attempts=2, initial=0.01, connect_timeout=0.2)
        async with open_client(f"127.0.0.1:{port}", retry=policy, extensions=False) as c:
            with anyio.fail_after(10), pytest.raises(ConnectionLost, match=r"2 attempts.*no answer within 0.2 s"):
                await c.connect()
    finally:
        for s in fillers:
            s.close()
        listener.close()


class _AppError(Exception):
    pass


async def test_the_users_exception_keeps_its_cause_and_context(client: Client) -> None:
    """open_writer re-raised the body's exception 'from None', erasing its chain."""
    with pytest.raises(_AppError) as caught:
        async with client.writer("ch") as w:
            await w.write(b"x")
            try:
                raise KeyError("k")
            except KeyError as e:
                raise _AppError("failed") from e
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.__suppress_context__
    with pytest.raises(_AppError) as caught:
        async with client.writer("ch"):
            try:
                raise KeyError("inner")
            except KeyError:
                raise _AppError("while handling")  # noqa: B904 (the implicit context is the point)
    assert isinstance(caught.value.__context__, KeyError) and not caught.value.__suppress_context__
