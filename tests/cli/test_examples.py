"""The examples run as documented (real processes, a real server on port 0)."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from ..harness import REPO, LocalServer

EXAMPLES = REPO / "examples"


async def run_example(name: str, *args: str, cwd: Path) -> str:
    result = await trio.run_process([sys.executable, str(EXAMPLES / name), *args], cwd=cwd,
                                    capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_embedded_server(tmp_path: Path) -> None:
    out = await run_example("embedded_server.py", cwd=tmp_path)
    assert "read b'hello'" in out and "read b'world'" in out and "server stopped" in out


async def test_writer_app_then_checkpointed_consumer(server: LocalServer, tmp_path: Path) -> None:
    out = await run_example("write_app.py", server.addr, cwd=tmp_path)
    assert out.startswith("wrote 10000 events")
    first = (await run_example("consumer_checkpoint.py", server.addr, cwd=tmp_path)).splitlines()
    assert len(first) == 10000 and '"seq": 9999' in first[-1]
    again = (await run_example("consumer_checkpoint.py", server.addr, cwd=tmp_path)).splitlines()
    assert again == []  # the checkpoint resumes after the last message
    await run_example("write_app.py", server.addr, cwd=tmp_path)
    third = (await run_example("consumer_checkpoint.py", server.addr, cwd=tmp_path)).splitlines()
    assert len(third) == 10000 and '"seq": 0' in third[0]  # only the new events



async def test_asyncio_app_on_both_loops(server: LocalServer, tmp_path: Path) -> None:
    total = sum(i % 50 for i in range(1000))
    out = await run_example("asyncio_app.py", server.addr, cwd=tmp_path)
    assert out.startswith("end marker at ") and out.endswith(f"amounts since the last run: {total}\n")
    again = await run_example("asyncio_app.py", server.addr, "--trio", cwd=tmp_path)  # same code, Trio
    assert again.endswith(f"amounts since the last run: {total}\n")  # only what this run wrote
