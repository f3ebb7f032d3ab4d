"""``logd bench`` results: counters per phase, percentiles, and the printed report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Protocol

__all__ = ["BenchResult", "PhaseResult", "format_result"]

MIB: Final = 1024 * 1024



class BenchSettings(Protocol):
    """What the report shows of the configuration (:class:`logd_trio.tools.bench.BenchConfig`)."""

    @property
    def host(self) -> str: ...
    @property
    def conns(self) -> int: ...
    @property
    def topics(self) -> int: ...
    @property
    def duration(self) -> float: ...
    @property
    def size(self) -> int: ...
    @property
    def message_size(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def read_batches(self) -> int: ...


@dataclass(slots=True)
class PhaseResult:
    """Counters of one phase; latencies in seconds, one per request."""

    name: str
    seconds: float = 0.0
    bytes: int = 0
    batches: int = 0
    messages: int = 0
    requests: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def mib_per_s(self) -> float:
        return self.bytes / MIB / self.seconds if self.seconds else 0.0

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds if self.seconds else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def percentiles(self) -> dict[str, float]:
        """min/p50/p90/p99/max latency in seconds (nearest rank); empty when nothing was measured."""
        lat = sorted(self.latencies)
        if not lat:
            return {}
        n = len(lat)

        def rank(q: float) -> float:
            return lat[min(n - 1, max(0, math.ceil(q * n) - 1))]

        return {"min": lat[0], "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": lat[-1]}

    def as_dict(self) -> dict[str, object]:
        return {
            "seconds": self.seconds, "bytes": self.bytes, "batches": self.batches,
            "messages": self.messages, "requests": self.requests, "mib_per_s": self.mib_per_s,
            "batches_per_s": self.batches_per_s, "messages_per_s": self.messages_per_s,
            "requests_per_s": self.requests / self.seconds if self.seconds else 0.0,
            "latency_s": self.percentiles(),
        }


@dataclass(slots=True)
class BenchResult:
    config: BenchSettings
    frame_size: int
    messages_per_batch: int
    write: PhaseResult | None = None
    read: PhaseResult | None = None

    def as_dict(self) -> dict[str, object]:
        c = self.config
        out: dict[str, object] = {
            "host": c.host, "conns": c.conns, "topics": c.topics, "duration": c.duration,
            "size": c.size, "message_size": c.message_size, "in_flight": c.in_flight,
            "read_batches": c.read_batches, "frame_size": self.frame_size,
            "messages_per_batch": self.messages_per_batch,
        }
        if self.write is not None:
            out["write"] = self.write.as_dict()
        if self.read is not None:
            out["read"] = self.read.as_dict()
        return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}ms"


def format_result(result: BenchResult) -> str:
    """The human report, as printed by ``logd bench``."""
    c = result.config
    lines = [
        f"host {c.host}, {c.conns} conns, {c.topics} topics, {c.in_flight} in flight per conn, "
        f"{c.read_batches} batches per READ, {c.duration:g}s per phase, "
        f"batch {result.frame_size} B = {result.messages_per_batch} messages of {c.message_size} B"
    ]
    for phase in (result.write, result.read):
        if phase is None:
            continue
        lines.append(
            f"{phase.name:5}  {phase.bytes / MIB:10.1f} MiB in {phase.seconds:.2f}s  "
            f"{phase.mib_per_s:9.1f} MiB/s  {phase.batches_per_s:10.0f} batches/s  "
            f"{phase.messages_per_s:12.0f} messages/s"
        )
        p = phase.percentiles()
        if p:
            what = "ack" if phase.name == "write" else "reply"
            lines.append(f"       {what} latency  " + "  ".join(f"{k} {_ms(v)}" for k, v in p.items()))
    return "\n".join(lines)


