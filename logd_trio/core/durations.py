"""Durations, one grammar for every flag, setting and environment variable.

A duration is a number of seconds (``0.4``, ``15``) or Go's notation: one or
more ``<number><unit>`` with units ``d`` (24 h, beyond Go), ``h``, ``m``, ``s``, ``ms``, ``us`` (``µs``,
micro sign or Greek mu) and ``ns`` (``15s``, ``1m30s``, ``200ms``, ``1.5h``).  Never negative, always finite.
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = ["DurationError", "format_duration", "parse_duration"]

_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(d|h|ms|m|s|us|\u00b5s|\u03bcs|ns)", re.ASCII)
_UNIT: Final = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6,
                "\u03bcs": 1e-6, "ns": 1e-9}
_NUMBER: Final = re.compile(r"\+?(\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)  # no '_', inf, nan
EXAMPLES: Final = "examples: 0.4, 400ms, 15s, 1m30s, 7d"


class DurationError(ValueError):
    """Not a duration; the message names ``key`` and shows examples."""


def parse_duration(value: str | float | int, *, key: str = "duration") -> float:
    """Seconds from a number or a Go-style duration string.  Raises :class:`DurationError`."""
    if isinstance(value, bool):
        raise DurationError(f"{key}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        if text.startswith("-"):
            raise DurationError(f"{key}: must not be negative, got {value!r}")
        seconds = float(text) if _NUMBER.fullmatch(text) else _parse_go(text, key, value)
    if not math.isfinite(seconds):
        raise DurationError(f"{key}: {value!r} is not a finite duration")
    if seconds < 0 or math.copysign(1.0, seconds) < 0:  # -0 too
        raise DurationError(f"{key}: must not be negative, got {value!r}")
    return seconds


def _parse_go(text: str, key: str, value: str) -> float:
    pos, seconds = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise DurationError(f"{key}: {value!r} is not a duration ({EXAMPLES})")
    return seconds


def format_duration(seconds: float) -> str:
    """Go's ``time.Duration.String`` for the values we use: ``15s``, ``1m0s``, ``200ms``."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    total = round(seconds, 9)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    s_text = f"{s:.9f}".rstrip("0").rstrip(".")
    if h:
        return f"{int(h)}h{int(m)}m{s_text}s"
    if m:
        return f"{int(m)}m{s_text}s"
    return f"{s_text}s"
