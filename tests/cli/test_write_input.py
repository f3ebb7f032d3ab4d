"""``logd write``'s input: a pipe is read on the Trio thread without blocking (grown to 1 MiB,
its flags restored after); only the module of the command run is imported."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import trio
import trio.lowlevel

from cli import main as cli_main
from cli.write_cmd import CHUNK, _pipe_chunks

_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_PIPE_MAX = int(Path("/proc/sys/fs/pipe-max-size").read_text())


async def test_a_pipe_is_read_without_blocking_then_restored() -> None:
    r, w = os.pipe()
    try:
        before = fcntl.fcntl(r, fcntl.F_GETFL)
        got = bytearray()
        async with _pipe_chunks(r) as read, trio.open_nursery() as n:
            assert read is not None
            assert fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(r, _F_GETPIPE_SZ) >= min(CHUNK, _PIPE_MAX)

            async def produce() -> None:
                for i in range(50):
                    await trio.to_thread.run_sync(os.write, w, b"%d\n" % i * 1000)
                    await trio.lowlevel.checkpoint()
                os.close(w)

            n.start_soon(produce)
            while chunk := await read():  # waits for readability when the pipe is empty
                got += chunk
        assert bytes(got) == b"".join(b"%d\n" % i * 1000 for i in range(50))
        assert fcntl.fcntl(r, fcntl.F_GETFL) == before  # shared with the other holders of the pipe
    finally:
        os.close(r)


async def test_a_regular_file_is_not_read_as_a_pipe(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x\n")
    with p.open("rb") as f:
        async with _pipe_chunks(f.fileno()) as read:
            assert read is None
        assert not fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def test_a_command_imports_only_its_module() -> None:
    assert cli_main._modules_for(["write", "--topic", "t", "x"]) == ("write_cmd",)
    assert cli_main._modules_for(["ping"]) == ("info_cmds",)
    assert cli_main._modules_for(["--help"]) == cli_main._ALL
    assert cli_main._modules_for([]) == cli_main._ALL
    assert cli_main._modules_for(["no-such-command"]) == cli_main._ALL
    code = ("import sys; sys.argv = ['logd', 'write', '--help']; from logd_trio_cli import main\n"
            "try:\n    main.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('logd_trio.server', 'logd_trio.tools'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "Usage: logd write" in out.stdout
    assert out.stdout.strip().endswith("[]"), out.stdout[-300:]  # neither the server nor the bench engine
    assert {"serve", "write", "read", "bench", "ping"} <= {c.name for c in cli_main.app.registered_commands}
