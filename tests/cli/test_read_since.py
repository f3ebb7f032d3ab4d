"""``logd read --since`` / ``--offset @TIME`` and ``Client.seek`` against a real server (own thread)
on a data directory whose batches were stamped two hours and twenty minutes ago (real files)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import trio
from logd_trio_cli.main import app
from typer.testing import CliRunner

from logd_trio.client.client import open_client
from logd_trio.core.errors import NotFound
from logd_trio.core.framing import build_body, build_frame
from logd_trio.server.storage.topic_log import TopicLog

from .test_cli_client import server_thread


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _stamped(root: Path, now_ms: int) -> list[int]:
    """Topic ``t``: batches a, b two hours before ``now_ms``; c, d twenty minutes before; offsets."""
    tl = TopicLog.open(root, "t", partition_size=10**6, partitions=8)
    tl.now_ms = 0  # the times below are in the past: set them as an earlier process would have
    offs = []
    for body, age_ms in ((b"a", 7_200_000), (b"b", 7_199_000), (b"c", 1_200_000), (b"d", 1_199_000)):
        tl.tick(now_ms - age_ms)
        offs.append(tl.append(build_frame("t", build_body([body]), 1), 1))
    tl.close()
    return offs


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat().replace("+00:00", "Z")


def test_read_since_and_at_a_time(tmp_path: Path) -> None:
    now = time.time_ns() // 1_000_000
    _stamped(tmp_path / "d", now)
    with server_thread(tmp_path / "d") as addr:
        assert _cli("read", "--host", addr, "-t", "t", "--since", "1h") == (0, "c\nd\n")
        assert _cli("read", "--host", addr, "-t", "t", "--since", "3h") == (0, "a\nb\nc\nd\n")
        assert _cli("read", "--host", addr, "-t", "t", "--since", "1d") == (0, "a\nb\nc\nd\n")
        assert _cli("read", "--host", addr, "-t", "t", "--since", "10m") == (0, "")  # nothing that new
        for age in ("100000d", "2000000d"):  # longer than since 1970: everything
            assert _cli("read", "--host", addr, "-t", "t", "--since", age) == (0, "a\nb\nc\nd\n"), age
        assert _cli("read", "--host", addr, "-t", "t", "--offset", "@" + _iso(now - 7_199_000)) == (0, "b\nc\nd\n")
        assert _cli("read", "--host", addr, "-t", "t", "--offset", "@" + _iso(now - 1_199_000)) == (0, "d\n")
        # a zone other than UTC names the same instant
        plus2 = datetime.timezone(datetime.timedelta(hours=2))
        local = datetime.datetime.fromtimestamp((now - 1_200_000) / 1000, plus2)
        assert _cli("read", "--host", addr, "-t", "t", "--offset", "@" + local.isoformat()) == (0, "c\nd\n")
        code, out = _cli("read", "--host", addr, "-t", "nope", "--since", "1h")
        assert code != 0 and "does not exist" in out


@pytest.mark.parametrize(("args", "says"), [
    (["--since", "10 minutes"], "is not a duration"),
    (["--since", "-5m"], "must not be negative"),
    (["--offset", "@yesterday"], "is not a time"),
    (["--offset", "@2026-12-01T10:00:00"], "no time zone"),
    (["--offset", "@1969-12-31T23:00:00Z"], "before 1970"),
    (["--since", "1h", "--offset", "0"], "use one of"),
    (["--since", "1h", "--from-beginning"], "use one of"),
])
def test_bad_times_are_clear_errors(args: list[str], says: str) -> None:
    code, out = _cli("read", "--host", "127.0.0.1:1", "-t", "t", *args)  # refused before connecting
    assert code == 2 and says in out, out


def test_client_seek(tmp_path: Path) -> None:
    now = time.time_ns() // 1_000_000
    offs = _stamped(tmp_path / "d", now)
    with server_thread(tmp_path / "d") as addr:
        async def main() -> None:
            async with open_client(addr) as c:
                assert await c.seek("t", 0) == offs[0]
                assert await c.seek("t", (now - 1_200_000) / 1000) == offs[2]
                at = datetime.datetime.fromtimestamp((now - 1_200_000) / 1000, datetime.UTC)
                assert await c.seek("t", at) == offs[2]
                assert await c.seek("t", at + datetime.timedelta(milliseconds=1)) == offs[3]
                head = (await c.topics())["t"][1]
                assert await c.seek("t", time.time() + 60) == head
                with pytest.raises(NotFound):
                    await c.seek("nope", 0)
                with pytest.raises(ValueError, match="time zone"):
                    await c.seek("t", datetime.datetime(2026, 12, 1))  # naive: the point
                with pytest.raises(ValueError, match="after 1970"):
                    await c.seek("t", -1.0)

        trio.run(main)
