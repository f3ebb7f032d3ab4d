"""`logd topics --json` and `logd topic delete` against a real server in its own thread."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from logd_trio_cli.main import app
from typer.testing import CliRunner

from logd_trio.core.framing import build_body, build_frame

from .test_cli_client import server_thread


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_topics_json_has_offsets_bytes_batches_and_last_append(tmp_path: Path) -> None:
    with server_thread(tmp_path / "d") as addr:
        before = time.time()
        code, out = _cli("write", "--host", addr, "-t", "t1", "a", "b", "c")
        assert code == 0, out
        code, out = _cli("write", "--host", addr, "-t", "t1", "d")
        assert code == 0, out
        code, out = _cli("topics", "--host", addr, "--json")
        assert code == 0, out
    rows = {row["name"]: row for row in json.loads(out)}
    assert set(rows) == {"default", "t1"}
    t1 = rows["t1"]
    # each `logd write` above sent its messages as one batch
    frames = [build_frame("t1", build_body([b"a", b"b", b"c"]), 3), build_frame("t1", build_body([b"d"]), 1)]
    assert (t1["first"], t1["head"]) == (0, sum(map(len, frames)))
    assert t1["bytes"] == t1["head"] and t1["batches"] == 2
    assert before - 2 <= t1["last_append_ms"] / 1000 <= time.time() + 1  # mtime granularity
    assert isinstance(t1["last_append"], str) and t1["last_append"].endswith("Z")
    assert rows["default"]["batches"] == 0 and rows["default"]["last_append"] is None


def test_topic_delete_ends_a_follower_with_a_clear_error(tmp_path: Path) -> None:
    with server_thread(tmp_path / "d") as addr:
        assert _cli("write", "--host", addr, "-t", "t", "first")[0] == 0
        follower = subprocess.Popen(
            [sys.executable, "-m", "logd_trio_cli.main", "read", "--host", addr, "-t", "t", "--follow"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            assert follower.stdout is not None
            assert follower.stdout.readline() == b"first\n"
            deadline = time.monotonic() + 10
            while "longpoll.waiting: 1" not in _cli("stats", "--host", addr)[1]:  # it waits at the head
                assert time.monotonic() < deadline and follower.poll() is None
            code, out = _cli("topic", "delete", "t", "--host", addr)
            assert code == 2 and "--yes" in out  # no terminal to confirm on: refused, nothing deleted
            code, out = _cli("topic", "delete", "t", "--host", addr, "--yes")
            assert (code, out) == (0, "deleted topic t\n")
            _, err = follower.communicate(timeout=10)
        finally:
            follower.kill()
            follower.wait()
        assert follower.returncode not in (0, None) and b"topic deleted" in err, err
        code, out = _cli("topic", "delete", "t", "--host", addr, "--yes")
        assert code == 5 and "not found" in out  # NotFound's exit code
        assert "t" not in {row["name"] for row in json.loads(_cli("topics", "--host", addr, "--json")[1])}
