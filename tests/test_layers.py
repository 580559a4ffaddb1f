"""The house's shape: imports only point down, and no module reaches back to one that reaches it.

Every ``import`` is counted, wherever it stands (module level, inside a function, under TYPE_CHECKING): an
in-function import hides a loop from Python, not from a reader. Layers, bottom to top::

    store  <-  runtime  <-  extract  <-  train  <-  cluster  <-  hrsa.cli
                       <-  analyze (beside extract: neither imports the other)

and inside analyze/: accumulators <- metrics, streaming <- config <- local <- pair <- results <- report <- job <- cli.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the hrsa package

# A folder may import a folder of a lower rank (and itself), never one of an equal or higher rank.
FOLDER_RANKS = {"hrsa": 0, "store": 0, "runtime": 1, "extract": 2, "analyze": 2, "train": 3, "cluster": 4, "cli": 5,
                "__main__": 6}
ANALYZE_RANKS = {"accumulators": 0, "metrics": 1, "streaming": 1, "config": 2, "local": 3, "pair": 4, "results": 5,
                 "report": 6, "job": 7, "cli": 8, "__init__": 9}


def module_names(root: Path) -> dict[str, Path]:
    """``hrsa.x.y`` -> file, for every module of the package (tests, benchmarks and configs are not the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in {"tests", "benchmarks", "configs", ".venv", "build"} or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["hrsa", *parts])] = path
    return out


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> Iterator[tuple[str, int]]:
    """Every hrsa module that ``name`` imports, with the line, resolved to a module of the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            # "from hrsa.analyze import metrics" imports the module hrsa.analyze.metrics
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "import hrsa.store.errors as e" -> that module
                target = target.rpartition(".")[0]
            if target.startswith("hrsa") and target != name:
                yield target, node.lineno


def layer(name: str) -> tuple[str, int]:
    parts = name.split(".")
    folder = parts[1] if len(parts) > 1 else "hrsa"
    return folder, FOLDER_RANKS[folder]


def analyze_layer(name: str) -> tuple[str, int] | None:
    parts = name.split(".")
    if parts[:2] != ["hrsa", "analyze"]:
        return None
    part = parts[2] if len(parts) > 2 else "__init__"
    return part, ANALYZE_RANKS[part]


def upward_imports(root: Path) -> list[str]:
    modules = module_names(root)
    problems = []
    for name, path in modules.items():
        for target, line in imports_of(name, path, modules):
            (f_from, r_from), (f_to, r_to) = layer(name), layer(target)
            if f_from != f_to and r_to >= r_from:
                problems.append(f"{path.relative_to(root)}:{line}: {name} imports {target} ({f_from} may not import {f_to})")
                continue
            a_from, a_to = analyze_layer(name), analyze_layer(target)
            if a_from and a_to and a_from[0] != a_to[0] and a_to[1] >= a_from[1]:
                problems.append(f"{path.relative_to(root)}:{line}: {name} imports {target} "
                                f"(analyze/{a_from[0]} may not import analyze/{a_to[0]})")
    return list(dict.fromkeys(problems))


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a loop of imports."""
    modules = module_names(root)
    graph = {name: sorted({t for t, _ in imports_of(name, path, modules)}) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_imports_only_point_down() -> None:
    problems = upward_imports(ROOT)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_loops() -> None:
    cycles = import_cycles(ROOT)
    assert not cycles, "import loops:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# The checker itself: each loop that hrsa once had is caught (a checker that finds nothing proves nothing).
FORMER_LOOPS = {
    "cluster <-> extract": {"extract/job.py": "def f():\n    from hrsa.cluster.connection import connect\n",
                            "cluster/runner.py": "from hrsa.extract.job import run_extraction\n"},
    "cluster <-> train": {"train/trainer.py": "def f():\n    from hrsa.cluster.connection import connect\n",
                          "cluster/runner.py": "def g():\n    from hrsa.train.trainer import run_training\n"},
    "analyze/pair <-> analyze/local": {"analyze/pair.py": "from hrsa.analyze.local.knn import knn_pair\n",
                                       "analyze/local/knn.py": "def f():\n    from hrsa.analyze.pair import TokenSelection\n"},
    "report -> results -> figures -> dynamics -> report": {
        "analyze/report/html.py": "from hrsa.analyze.results import SCHEMA\n",
        "analyze/results.py": "def f():\n    from hrsa.analyze.report.figures import plot_figures\n",
        "analyze/report/figures.py": "if True:\n    from hrsa.analyze.report.dynamics import Dynamics\n",
        "analyze/report/dynamics.py": "from hrsa.analyze.report.html import read_results\n"},
    "config loads the orchestration": {"analyze/config.py": "from hrsa.analyze.pair import METRICS\n",
                                       "analyze/pair.py": "x = 1\n"},
    "analyze imports extract": {"analyze/local/probe.py": "def f():\n    from hrsa.extract.corpus import load_records\n",
                                "extract/corpus.py": "x = 1\n"},
}


@pytest.mark.parametrize("loop", sorted(FORMER_LOOPS))
def test_checker_catches_former_loops(tmp_path: Path, loop: str) -> None:
    for rel, code in FORMER_LOOPS[loop].items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
        for parent in path.relative_to(tmp_path).parents:
            (tmp_path / parent / "__init__.py").touch()
    assert upward_imports(tmp_path), f"{loop}: no upward import found"
