"""ERR replies never carry the server's directory names (the log keeps them)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from logd_trio.server.reasons import public_reason, strip_paths

from ..harness import make_config, start_server
from ..wire import Wire, batch_request


async def test_storage_error_reply_has_no_server_path(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="logd_trio")
    workdir = tmp_path / "data"
    srv = await start_server(nursery, make_config(workdir, fsync="never", partition_size=1000))
    req = batch_request("t", [b"x" * 200])
    w = await Wire.connect(srv.host, srv.port)
    await w.send(req)
    assert await w.reply() == b"OK 0 1\r\n"
    # Where each later partition would be created, something that is not a file is in the way.
    for k in range(1, 30):
        (workdir / "t" / f"{k * len(req)}.log").mkdir()
    for _ in range(10):
        await w.send(req)
        reply = (await w.reply()).decode()
        if reply.startswith("ERR"):
            break
    assert reply.startswith("ERR storage error: "), reply
    assert "Is a directory" in reply  # still says what went wrong
    assert str(tmp_path) not in reply and "/" not in reply.split("Is a directory")[1], reply
    assert any(str(workdir) in r.getMessage() for r in caplog.records)  # the operator gets the path


def test_public_reason_cuts_paths_to_their_last_component() -> None:
    try:
        open("/nonexistent-dir/sub/12.log")  # noqa: SIM115
    except OSError as e:
        err = e
    assert public_reason(err) == "[Errno 2] No such file or directory: '12.log'"
    chained = RuntimeError(f"topic t: recovering /srv/data/t/0.log: {err}")
    chained.__cause__ = err
    assert "/srv" not in public_reason(chained) and "0.log" in public_reason(chained)
    rel = OSError(13, "Permission denied", "logs/t/5.index")  # a relative data directory too
    assert public_reason(rel) == "[Errno 13] Permission denied: '5.index'"
    assert strip_paths("read-only after an I/O error (fsync failed: Input/output error)") == (
        "read-only after an I/O error (fsync failed: Input/output error)")
