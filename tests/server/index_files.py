"""Reading and damaging ``.index`` files in tests, whatever their version (docs/storage.md)."""

from __future__ import annotations

import struct

from logd_trio.server.storage.index import HEADER, HEADER_SIZE, REC, REC_SIZE, REC_V2

__all__ = ["layout", "put_end", "records", "times", "v1_of"]


def layout(raw: bytes | bytearray) -> tuple[int, int]:
    """``(where record 0 starts, record size)``: (16, 24) for v2, (0, 16) for v1."""
    return (HEADER_SIZE, REC_V2.size) if raw[:HEADER_SIZE] == HEADER else (0, REC_SIZE)


def records(raw: bytes | bytearray) -> list[tuple[int, int, int | None]]:
    """``(end, cum, time_ms)`` of each whole record (time None in a v1 file)."""
    base, rs = layout(raw)
    out: list[tuple[int, int, int | None]] = []
    for at in range(base, len(raw) - rs + 1, rs):
        end, cum = REC.unpack_from(raw, at)
        t = struct.unpack_from("<Q", raw, at + 16)[0] if rs == REC_V2.size else None
        out.append((end, cum, t))
    return out


def times(raw: bytes | bytearray) -> list[int]:
    """The append times of a v2 file's records."""
    out = [t for _, _, t in records(raw)]
    assert raw[:HEADER_SIZE] == HEADER and all(t is not None for t in out)
    return [t for t in out if t is not None]


def put_end(raw: bytearray, k: int, end: int) -> None:
    """Overwrite record ``k``'s end position."""
    base, rs = layout(raw)
    struct.pack_into("<Q", raw, base + k * rs, end)


def v1_of(raw: bytes) -> bytes:
    """The same records in the v1 format (no header, no times): what an earlier release wrote."""
    return b"".join(REC.pack(e, c) for e, c, _ in records(raw))
