"""The one address grammar, the one duration grammar, the one exception-group rule."""

from __future__ import annotations

import pytest

from logd_trio.core.addresses import AddressError, format_address, parse_address
from logd_trio.core.defaults import DEFAULT_PORT
from logd_trio.core.durations import DurationError, format_duration, parse_duration
from logd_trio.core.errors import unwrap_group


@pytest.mark.parametrize(("text", "expected"), [
    ("h:1", ("h", 1)),
    ("h", ("h", DEFAULT_PORT)),
    ("localhost", ("localhost", DEFAULT_PORT)),
    (":9", ("127.0.0.1", 9)),
    ("[::1]:5", ("::1", 5)),
    ("[::1]", ("::1", DEFAULT_PORT)),
    ("::1", ("::1", DEFAULT_PORT)),
    (" 10.0.0.1:65535 ", ("10.0.0.1", 65535)),
])
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert parse_address(format_address(*expected)) == expected


@pytest.mark.parametrize("text", [
    "h:x", "h:", "h:0", "h:65536", "[::1", "[::1]x", "[::1]:", "a b:1", ":",
    "h:\u0668\u0660", "h:\uff18\uff10",  # non-ASCII digits (isdigit() took them)
    "[]", "[]:80", "[localhost]:80",  # empty or not IPv6 in the brackets (was: 127.0.0.1)
    "localhost::80", "1.2.3.4:80:", "a:b:c",  # not a bare IPv6 host either
])
def test_bad_addresses_say_why(text: str) -> None:
    with pytest.raises(AddressError, match=repr(text).replace("[", r"\[")):
        parse_address(text)


def test_bare_ipv6_with_a_zone() -> None:
    assert parse_address("fe80::1%eth0") == ("fe80::1%eth0", DEFAULT_PORT)


def test_address_options() -> None:
    assert parse_address("h:0", allow_zero=True) == ("h", 0)
    with pytest.raises(AddressError, match="HOST:PORT"):
        parse_address("h", default_port=None)


@pytest.mark.parametrize(("text", "seconds"), [
    ("0.4", 0.4), ("15", 15.0), ("400ms", 0.4), ("2s", 2.0), ("1m", 60.0), ("1m30s", 90.0),
    ("1h2m3s", 3723.0), ("1.5h", 5400.0), ("250us", 250e-6), ("10\u00b5s", 10e-6), ("10\u03bcs", 10e-6),
    ("5ns", 5e-9), (".5s", 0.5), ("1e3", 1000.0),
    (3, 3.0), (0.25, 0.25),
])
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s", "1m30", "-1s", "-1", "inf", "nan", "1s 2s", True,
                                  "1_000", "-0", "-0.0", -0.0, "\u0661\u0660", "\u0661\u0660s"])
def test_bad_durations_name_the_key(text: str | bool) -> None:
    with pytest.raises(DurationError, match=r"^flush: "):
        parse_duration(text, key="flush")


def test_format_duration_round_trips() -> None:
    for s in (15, 30, 60, 0.2, 90, 3723):
        assert parse_duration(format_duration(s)) == pytest.approx(s)
    assert [format_duration(s) for s in (15, 60, 0.2, 90)] == ["15s", "1m0s", "200ms", "1m30s"]


class Cancel(BaseException):
    pass


def test_unwrap_group_one_rule() -> None:
    plain = ValueError("x")
    assert unwrap_group(plain) is plain
    a, b, c = OSError("a"), KeyError("b"), Cancel()
    group = BaseExceptionGroup("g", [c, ExceptionGroup("inner", [a]), b])
    first = unwrap_group(group, skip=(Cancel,))
    assert first is a
    assert first.__notes__ == ["also raised: KeyError('b')"]
    only = Cancel()
    assert unwrap_group(BaseExceptionGroup("g", [only]), skip=(Cancel,)) is only
