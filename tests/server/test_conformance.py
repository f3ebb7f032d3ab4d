"""The Go logd transcripts of ../shared/conformance, replayed over real sockets."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from ..harness import CONFORMANCE, make_config, start_server

if CONFORMANCE is None:
    pytest.skip(
        "shared/conformance not found beside the repository (set LOGD_SHARED_DIR): Go transcripts not replayed",
        allow_module_level=True,
    )

from replay import load_cases, run_scenario

CASES: list[dict[str, Any]] = load_cases()
DEFAULT = [c for c in CASES if "server" not in c]
SPECIAL = [c for c in CASES if "server" in c]


async def _replay(nursery: trio.Nursery, tmp_path: Path, cases: list[dict[str, Any]], **settings: Any) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "data", **settings))
    failures = []
    for case in cases:
        result = await trio.to_thread.run_sync(partial(run_scenario, srv.host, srv.port, case))
        if result.status != "PASS":
            failures.append(result.report())
    srv.scope.cancel()
    assert not failures, "\n".join(failures)


async def test_all_default_scenarios_on_one_server(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Every compat, fixed and ext scenario, in file order, against one fresh server."""
    await _replay(nursery, tmp_path, DEFAULT)


@pytest.mark.parametrize("case", SPECIAL, ids=lambda c: c["name"])
async def test_scenarios_with_settings(case: dict[str, Any], nursery: trio.Nursery, tmp_path: Path) -> None:
    settings = {k.replace("-", "_"): v for k, v in case["server"].items()}
    await _replay(nursery, tmp_path, [case], **settings)
