"""A/B of the hot-path edits: the same bench against servers with an edit switched off by monkeypatch.

    python benchmarks/ab.py [--duration 2] [--rounds 2]

Variants (each a fresh ``logd serve --fsync never`` on /dev/shm, 1 connection):

``all``          the tree as is
``exact-walk``   ``batch.count_messages`` without its fast paths (every message walked in Python)
``checkpoints``  ``Topic.try_append`` disabled: every BATCH awaits the topic channel's ``send``
                 (a Trio checkpoint per batch, as before the edit)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from procs import stop_server  # noqa: E402
from run import free_port, wait_listening  # noqa: E402

from logd_trio.tools.bench import BenchConfig, run_bench  # noqa: E402

PATCHES = {
    "all": "",
    "exact-walk": "import logd_trio.core.framing as b; b._count_uniform = lambda *a: 0; b._count_fast = lambda *a: 0",
    "checkpoints": "import logd_trio.server.topic as t; t.Topic.try_append = lambda self, f, c: None",
}


def measure(variant: str, msize: int, duration: float) -> float:
    port = free_port()
    code = f"{PATCHES[variant]}\nimport sys; from cli.main import main; sys.argv[0] = 'logd'; main()"
    workdir = Path(f"/dev/shm/logd-ab-{os.getpid()}")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--host", f"127.0.0.1:{port}", "--workdir",
                             str(workdir), "--fsync", "never"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        cfg = BenchConfig(host=f"127.0.0.1:{port}", duration=duration, message_size=msize, read=False)
        res = trio.run(run_bench, cfg)
        assert res.write is not None
        return res.write.mib_per_s
    finally:
        stop_server(proc)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for msize in (31, 1000):
        for variant in PATCHES:
            runs = [measure(variant, msize, args.duration) for _ in range(args.rounds)]
            print(f"msg={msize:4}B  {variant:12}  write MiB/s: " + "  ".join(f"{r:7.1f}" for r in runs), flush=True)


if __name__ == "__main__":
    main()
