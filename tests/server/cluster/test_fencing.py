"""The pure lease and leader decisions, and the keepalive task in virtual time
(with a scripted etcd lease endpoint standing in for etcd)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from logd_trio.server.cluster.etcd_wire import EtcdUnavailable, LeaseNotFound
from logd_trio.server.cluster.fencing import LeaderGate, LeaseClock
from logd_trio.server.cluster.session import Session


def test_deadline_counts_from_the_send_time_not_the_reply() -> None:
    clock = LeaseClock(2.0, sent_at=100.0, margin=0.2)
    assert clock.deadline == 102.0 and clock.stop_at == pytest.approx(101.8)
    sent = clock.sending(101.0)
    # the reply comes 0.7 s later: the lease is still counted from 101.0
    clock.renewed(sent, 2)
    assert clock.deadline == 103.0
    assert clock.valid(102.79) and not clock.valid(102.8)
    assert clock.remaining(102.0) == pytest.approx(0.8)
    # a late reply to an older keepalive never moves the deadline back
    clock.renewed(100.5, 2)
    assert clock.deadline == 103.0


def test_renewal_schedule_and_retry_after_failure() -> None:
    clock = LeaseClock(3.0, sent_at=0.0)
    assert clock.margin == pytest.approx(0.3) and clock.retry == pytest.approx(0.3)
    assert clock.next_renewal() == pytest.approx(1.0)  # ttl / 3 after the last good send
    clock.sending(1.0)
    clock.failed()
    assert clock.next_renewal() == pytest.approx(1.3)  # retried sooner
    assert clock.valid(2.69) and not clock.valid(2.7)  # still counted from the grant at 0
    sent = clock.sending(1.3)
    clock.renewed(sent, 3)
    assert clock.failures == 0 and clock.next_renewal() == pytest.approx(2.3)


def test_lost_is_final() -> None:
    clock = LeaseClock(2.0, sent_at=0.0)
    clock.expired()
    clock.renewed(0.5, 2)
    assert clock.lost and not clock.valid(0.6) and clock.remaining(0.6) == 0
    fresh = LeaseClock(2.0, sent_at=0.0)
    fresh.renewed(0.5, 0)  # a keepalive answered with TTL 0: the lease is gone
    assert fresh.lost


def test_bad_lease_parameters() -> None:
    for kw in ({"margin": 2.0}, {"margin": -1.0}, {"retry": 0.0}):
        with pytest.raises(ValueError, match="lease"):
            LeaseClock(2.0, 0.0, **kw)
    with pytest.raises(ValueError, match="TTL"):
        LeaseClock(0.0, 0.0)
    with pytest.raises(ValueError, match="epochs start at 1"):
        LeaderGate(0, LeaseClock(2.0, 0.0))


def test_leader_gate() -> None:
    clock = LeaseClock(2.0, sent_at=0.0, margin=0.2)
    gate = LeaderGate(3, clock)
    assert gate.may_acknowledge(1.0) and gate.refusal(1.0) is None
    gate.observe_epoch(2)
    gate.observe_epoch(3)
    assert gate.may_acknowledge(1.0)
    refusal = gate.refusal(1.9)
    assert refusal is not None and "etcd unreachable" in refusal and "1.90s" in refusal
    clock.renewed(1.0, 2)
    assert gate.may_acknowledge(1.9)
    gate.observe_epoch(4)
    assert gate.refusal(1.9) == "not leader: epoch 4 superseded epoch 3"
    clock.renewed(1.5, 2)
    gate.depose("something else")
    assert gate.refusal(1.9) == "not leader: epoch 4 superseded epoch 3"  # deposed for good, first reason kept


class ScriptedLeases:
    """Stands in for etcd's lease endpoint: answers, hangs, fails or forgets the lease."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self.mode = "ok"
        self.calls: list[float] = []

    async def renew(self, lease_id: int) -> int:
        self.calls.append(trio.current_time())
        if self.mode == "hang":
            await trio.sleep_forever()
        if self.mode == "unavailable":
            raise EtcdUnavailable("scripted")
        if self.mode == "gone":
            raise LeaseNotFound(5, "lease not found")
        if self.mode == "slow":
            await trio.sleep(0.4)
        return self.ttl


async def test_keepalive_task_stops_the_leader_in_time_and_recovers(autojump_clock: trio.testing.MockClock) -> None:
    etcd = ScriptedLeases(ttl=2)
    start = trio.current_time()
    session = Session(7, LeaseClock(2, start, margin=0.2), etcd.renew)
    gate = LeaderGate(1, session.clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.keep_alive)
        await trio.sleep(10)
        assert gate.may_acknowledge(trio.current_time())
        assert 14 <= len(etcd.calls) <= 16  # every ttl / 3
        etcd.mode = "hang"  # etcd stops answering
        last_good = session.clock.last_ok_sent
        await trio.sleep_until(last_good + 1.8 - 0.001)
        assert gate.may_acknowledge(trio.current_time())
        await trio.sleep(0.002)
        assert not gate.may_acknowledge(trio.current_time())  # stopped at sent + ttl - margin exactly
        hung = len(etcd.calls)
        await trio.sleep(3)
        gaps = [b - a for a, b in zip(etcd.calls[hung - 1:], etcd.calls[hung:], strict=False)]
        assert gaps and max(gaps) <= 0.5 + 1e-9  # every attempt bounded by ttl / 4, then retried
        etcd.mode = "ok"
        await trio.sleep(0.6)
        assert gate.may_acknowledge(trio.current_time())  # the lease had survived: renewed again
        assert not session.lost.is_set()
        etcd.mode = "gone"
        with trio.fail_after(1):
            await session.lost.wait()
        assert not gate.may_acknowledge(trio.current_time())
        assert gate.refusal(trio.current_time()) == "not leader: the lease expired in etcd"
    # keep_alive returned by itself once the lease was gone


async def test_slow_replies_count_from_their_send_time(autojump_clock: trio.testing.MockClock) -> None:
    etcd = ScriptedLeases(ttl=2)
    etcd.mode = "slow"
    session = Session(7, LeaseClock(2, trio.current_time(), margin=0.2), etcd.renew)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.keep_alive)
        await trio.sleep(5)
        assert session.clock.deadline == pytest.approx(session.clock.last_ok_sent + 2)
        assert session.clock.last_ok_sent in etcd.calls  # a send time, not a reply time
        etcd.mode = "unavailable"
        await trio.sleep(3)
        assert session.failed_renewals >= 5 and not session.valid() and not session.lost.is_set()
        nursery.cancel_scope.cancel()
