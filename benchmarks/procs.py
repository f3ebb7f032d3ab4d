"""Process helpers shared by the benchmark scripts."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

STOP_WAIT = 30.0  # seconds a stopped process gets to exit before it is killed


def stop_server(proc: subprocess.Popen[Any], wait: float = STOP_WAIT) -> int:
    """Stop ``proc`` (a server, a load generator): SIGTERM, up to ``wait`` seconds for it to exit,
    then SIGKILL.  Returns its exit status; a process that already exited is only reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
