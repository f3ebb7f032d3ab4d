"""Layout rules that import-linter's contracts do not cover (run by .ci/run):

- no import cycle between any two modules of the library or the CLI (TYPE_CHECKING
  and function-level imports count: a cycle hidden behind them is still a cycle);
- no library module over MAX_LINES lines;
- the server hands blocking work to worker threads only through
  ``logd_trio.server.blocking.run_blocking`` (the seam the slow-disk and virtual-time
  test layers watch); THREAD_HOPS_ALLOWED names the exceptions (no disk work).

Exits 1 naming every offender.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

MAX_LINES = 400
THREAD_HOPS_ALLOWED = {"logd_trio/server/blocking.py", "logd_trio/server/metrics.py"}
ROOT = Path(__file__).resolve().parents[1]


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in modules:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            succ = edges[node]
            if i < len(succ):
                work.append((node, i + 1))
                nxt = succ[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def main() -> int:
    graph = grimp.build_graph("logd_trio", "logd_trio_cli")
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for path in sorted((ROOT / "logd_trio").rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            problems.append(f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_LINES})")
    for path in sorted((ROOT / "logd_trio" / "server").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if "to_thread" in path.read_text() and rel not in THREAD_HOPS_ALLOWED:
            problems.append(f"{rel}: hands work to a thread without server.blocking.run_blocking")
    for p in problems:
        print(p)
    print(f"layout: {len(problems)} problem(s)" if problems else "layout: no cycles, no module over the limit")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
