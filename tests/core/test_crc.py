"""The CRC-32 the protocol uses: the optional fast implementation agrees with zlib's."""

from __future__ import annotations

import importlib
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from logd_trio.core import framing


@given(st.binary(max_size=5000), st.integers(0, 40))
def test_crc32_is_zlibs(data: bytes, cut: int) -> None:
    assert framing.crc32(data) == zlib.crc32(data)
    assert framing.crc32(memoryview(data)[cut:]) == zlib.crc32(data[cut:])
    assert framing.crc32(bytearray(data)) == zlib.crc32(data)


def test_the_fast_crc32_is_used_when_installed() -> None:
    try:
        fast = importlib.import_module("isal.isal_zlib")
    except ImportError:
        assert framing.crc32 is zlib.crc32  # not installed: zlib's
        return
    assert framing.crc32 is fast.crc32
    assert framing.crc32(b"x" * 70000) == zlib.crc32(b"x" * 70000)


def test_without_the_fast_crc32_zlib_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> object:
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert framing._pick_crc32() is zlib.crc32
