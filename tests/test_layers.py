"""The import structure: the layers contract (`lint-imports`, pyproject.toml) and no import cycles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

REPO = Path(__file__).resolve().parents[1]


def _graph():
    return grimp.build_graph("jobs", "runner", cache_dir=None)


def _cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_another_that_imports_it_back():
    """Any cycle, direct (a <-> b) or through others, counting imports inside functions too."""
    graph = _graph()
    cycles = _cycles(graph)
    details = [
        " -> ".join(cycle)
        + "; e.g. "
        + ", ".join(
            f"{a} -> {b}" for a in cycle for b in cycle if graph.direct_import_exists(importer=a, imported=b)
        )
        for cycle in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(details)


def test_engine_imports_nothing_of_batchrun_outside_the_engine():
    graph = _graph()
    bad = [
        f"{a} -> {b}"
        for a in sorted(graph.find_descendants("runner.engine"))
        for b in sorted(graph.find_modules_directly_imported_by(a))
        if not b.startswith("runner.engine")
    ]
    assert not bad, bad


def test_runner_never_imports_jobs():
    graph = _graph()
    bad = [
        f"{a} -> {b}"
        for a in sorted(graph.find_descendants("runner"))
        for b in sorted(graph.find_modules_directly_imported_by(a))
        if b == "jobs" or b.startswith("jobs.")
    ]
    assert not bad, bad


def test_lint_imports_keeps_the_contracts():
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed")
    run = subprocess.run([str(exe), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_folders_stay_small_enough_to_read_as_a_picture():
    """No folder of jobs/ or runner/ holds more than 12 Python modules directly (issue 39); the engine's
    top holds at most 6 (engine, config, types: the rest lives in folders named after their concern)."""
    crowded = {
        str(folder.relative_to(REPO)): n
        for top in ("jobs", "runner")
        for folder in [REPO / top, *(p for p in (REPO / top).rglob("*") if p.is_dir())]
        if (n := len(list(folder.glob("*.py")))) > 12
    }
    assert not crowded, crowded
    assert len(list((REPO / "runner" / "engine").glob("*.py"))) <= 6


def test_no_source_file_over_400_lines():
    long = {
        str(p.relative_to(REPO)): n
        for top in ("jobs", "runner")
        for p in (REPO / top).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
