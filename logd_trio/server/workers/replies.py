"""Where each relayed reply ends, in the byte stream the owner sends back (no copy kept).

A reply is one line (``OK ...``, ``ERR ...``, ``PONG``), or ``MOK <n>`` and
``n`` bytes plus CRLF, or, for a READ/TAIL, ``OK <offset> <n>`` and ``n`` frames
(each a ``BATCH`` line and its body, sized by the line).  The bytes themselves
are forwarded to the client as they arrive; only the lines are looked at.
Pure: no trio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from logd_trio.core.errors import InvalidBatchError
from logd_trio.core.framing import parse_frame_header

__all__ = ["BadRelay", "ReplySplitter"]

MAX_LINE: Final = 8192
_LINE, _FRAME_LINE, _SKIP = 0, 1, 2


class BadRelay(Exception):
    """The owner's bytes are not the replies owed (a bug: the relay is closed)."""


class ReplySplitter:
    """Counts off replies of a stream; call :meth:`feed` with each chunk in order."""

    __slots__ = ("_frames", "_line", "_mode", "_skip")

    def __init__(self) -> None:
        self._mode = _LINE
        self._line = bytearray()  # the line being read (a reply's or a frame's)
        self._skip = 0  # bytes of a body left
        self._frames = 0  # frames left in a READ reply

    def feed(self, data: bytes | bytearray | memoryview, owed: Sequence[bool]) -> int:
        """How many replies end in ``data``; ``owed[i]`` tells if the ``i``-th reply from the one in
        progress answers a READ/TAIL.  -1: ``data`` goes past the replies owed."""
        if isinstance(data, memoryview):
            data = bytes(data)  # one copy per chunk, so each line is found in place
        done = 0
        pos, n = 0, len(data)
        while pos < n:
            if done >= len(owed):
                return -1
            if self._mode == _SKIP:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                if self._skip == 0:
                    if self._frames:
                        self._mode = _FRAME_LINE
                    else:
                        self._mode = _LINE
                        done += 1
                continue
            nl = data.find(b"\n", pos, min(n, pos + MAX_LINE))
            if nl >= 0:
                nl -= pos
            else:
                self._line += data[pos:n]
                pos = n
                if len(self._line) > MAX_LINE:
                    raise BadRelay("reply line too long")
                continue
            self._line += data[pos:pos + nl + 1]
            pos += nl + 1
            line, self._line = bytes(self._line), bytearray()
            if self._mode == _FRAME_LINE:
                try:
                    head = parse_frame_header(line)
                except InvalidBatchError as e:
                    raise BadRelay(f"frame header: {e}") from None
                if head is None:
                    raise BadRelay("frame header incomplete")
                self._frames -= 1
                self._skip = head.frame_len - len(line)
                self._mode = _SKIP
                if self._skip <= 0:
                    raise BadRelay("frame shorter than its header")
                continue
            words = line.rstrip(b"\r\n").split(b" ")
            if words[0] == b"MOK" and len(words) == 2 and words[1].isdigit():
                self._skip = int(words[1]) + 2
                self._mode = _SKIP
            elif owed[done] and words[0] == b"OK" and len(words) == 3 and words[2].isdigit() and int(words[2]):
                self._frames = int(words[2])
                self._mode = _FRAME_LINE
            else:
                done += 1
        return done
