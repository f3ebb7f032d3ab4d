"""Pure decisions of the coordination layer: how long a lease surely lasts, when to
renew it, and whether a leader may still acknowledge.  No I/O, no Trio: times are
plain monotonic seconds passed in by the caller, so all of it is tested in
virtual time.

Why the send time: etcd renews a lease when it *processes* the keepalive, which
is after we sent it; so ``sent + ttl`` is a deadline etcd's expiry cannot come
before (give or take clock-rate drift, which the margin covers).  Counting from
the reply instead would stretch our belief by the reply's delay, and a reply
delayed by a pause or a slow network is exactly when it matters.
"""

from __future__ import annotations

__all__ = ["LeaderGate", "LeaseClock"]


class LeaseClock:
    """The lease deadline as this node may rely on it.

    ``deadline`` is ``sent + ttl`` of the latest successful grant or keepalive;
    ``stop_at`` is the deadline minus the margin: from then on a leader must not
    acknowledge.  Renewals are due every ``ttl / 3`` after the last successful
    send, and retried every ``retry`` after a failure.
    """

    def __init__(self, ttl: float, sent_at: float, *, margin: float | None = None,
                 retry: float | None = None) -> None:
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        self.ttl = ttl
        self.margin = ttl / 10 if margin is None else margin
        if not 0 <= self.margin < ttl:
            raise ValueError(f"lease margin must be in [0, ttl), got {self.margin}")
        self.retry = ttl / 10 if retry is None else retry
        if self.retry <= 0:
            raise ValueError(f"lease retry interval must be positive, got {self.retry}")
        self.deadline = sent_at + ttl
        self.last_ok_sent = sent_at
        self.last_attempt = sent_at
        self.failures = 0  # consecutive failed renewals
        self.lost = False  # etcd said the lease no longer exists: final

    @property
    def stop_at(self) -> float:
        return self.deadline - self.margin

    def valid(self, now: float) -> bool:
        return not self.lost and now < self.stop_at

    def remaining(self, now: float) -> float:
        """Seconds this node may still rely on the lease (0 when it may not)."""
        return 0.0 if self.lost else max(0.0, self.stop_at - now)

    def next_renewal(self) -> float:
        """When the next keepalive should be sent."""
        if self.failures:
            return self.last_attempt + self.retry
        return self.last_ok_sent + self.ttl / 3

    def attempt_timeout(self) -> float:
        """How long one keepalive may take before the next attempt replaces it."""
        return max(self.ttl / 4, self.retry)

    def sending(self, now: float) -> float:
        """Note a keepalive about to be sent at ``now``; returns its send time."""
        self.last_attempt = now
        return now

    def renewed(self, sent_at: float, ttl: float) -> None:
        """A keepalive sent at ``sent_at`` succeeded with ``ttl`` seconds."""
        if self.lost:
            return
        if ttl <= 0:
            self.expired()
            return
        self.failures = 0
        self.ttl = ttl
        self.last_ok_sent = max(self.last_ok_sent, sent_at)
        self.deadline = max(self.deadline, sent_at + ttl)

    def failed(self) -> None:
        """A keepalive got no answer (etcd unreachable or slow): retry sooner."""
        self.failures += 1

    def expired(self) -> None:
        """etcd says the lease is gone (expired or revoked)."""
        self.lost = True


class LeaderGate:
    """Whether the leader of ``epoch`` may acknowledge now.

    It may while its lease surely lasts and no newer epoch was seen; once deposed
    (a newer epoch, the leader key gone, resigned) it never may again.
    """

    def __init__(self, epoch: int, clock: LeaseClock) -> None:
        if epoch < 1:
            raise ValueError(f"epochs start at 1, got {epoch}")
        self.epoch = epoch
        self.clock = clock
        self.deposed_by: str | None = None

    def observe_epoch(self, epoch: int) -> None:
        """Another node's epoch was seen (in etcd, a fetch, a peer's reply)."""
        if epoch > self.epoch:
            self.depose(f"epoch {epoch} superseded epoch {self.epoch}")

    def depose(self, reason: str) -> None:
        if self.deposed_by is None:
            self.deposed_by = reason

    @property
    def deposed(self) -> bool:
        return self.deposed_by is not None

    def refusal(self, now: float) -> str | None:
        """None if this leader may acknowledge at ``now``, else why not (one line)."""
        if self.deposed_by is not None:
            return f"not leader: {self.deposed_by}"
        if self.clock.lost:
            return "not leader: the lease expired in etcd"
        if not self.clock.valid(now):
            return (f"not leader: lease not confirmed for {now - self.clock.last_ok_sent:.2f}s "
                    f"(etcd unreachable or slow)")
        return None

    def may_acknowledge(self, now: float) -> bool:
        return self.refusal(now) is None
