"""The server's log lines: plain text for people or one JSON object per line for log shippers.

Levels (see docs/operations.md): INFO for what an operator wants in the record
(start and stop, topic created, partition rotated, partitions removed by
retention, recovery repairs), WARNING for refused clients and limits hit (with
the peer's address), ERROR/CRITICAL for failures (a fail-stop topic).  ``-v``
adds DEBUG, which holds the per-connection events (opened, closed, why).
Only the ``logd_trio`` loggers go down to DEBUG: libraries stay at WARNING.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final, TextIO

__all__ = ["LOG_FORMATS", "JsonFormatter", "setup_logging"]

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes a call may add with ``extra=``: they become fields of a JSON line.
EXTRA_FIELDS: Final = ("topic", "peer", "partition", "offset")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
    ``logger``, ``message``, the extra fields set, and ``exception`` with a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        out: dict[str, object] = {
            "time": f"{stamp}.{int((record.created - seconds) * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`setup_logging` installs (so a second call replaces it)."""


def setup_logging(log_format: str = "text", *, verbose: bool = False, stream: TextIO | None = None) -> None:
    """Send log records to ``stream`` (stderr) in ``log_format``.

    Like :func:`logging.basicConfig`, it adds no handler when the process has configured
    logging itself (an application embedding the server): only the levels are set then.
    A second call replaces the handler of the first."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format: must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _Handler)]
    if len(ours) == len(root.handlers):
        for old in ours:
            root.removeHandler(old)
        handler = _Handler(sys.stderr if stream is None else stream)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("logd_trio").setLevel(logging.DEBUG if verbose else logging.INFO)
