"""The house's shape: imports only point down, no module reaches back to one that reaches it, and the store's
layout and the Ray connection each live in one place.

Every import is counted, wherever it stands (module level, inside a function, under TYPE_CHECKING): an
in-function import hides a loop from Python, not from a reader. So are dynamic imports: the module names of an
``__init__``'s ``_LAZY`` table and ``importlib.import_module("hrsa....")`` / ``__import__("hrsa....")``. Which
folder may import which is spelled out in :data:`ALLOWED_IMPORTS`::

    store  <-  runtime  <-  extract  <-  train  <-  cluster  <-  hrsa.cli  <-  hrsa.__main__
                       <-  analyze (beside extract and train: neither imports the other)  <-  cluster

and inside analyze/: accumulators <- metrics, streaming <- config <- local <- pair <- results <- report <- job <- cli.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the hrsa package

# The folders (top-level modules for cli and __main__) each folder may import, besides itself; ``hrsa`` (the root
# __init__: __version__) is importable by anyone. A folder missing here is a problem too: say where it belongs.
_BELOW_CLI = frozenset({"store", "runtime", "extract", "analyze", "train", "cluster"})
ALLOWED_IMPORTS: dict[str, frozenset[str]] = {
    "hrsa": frozenset(),
    "store": frozenset(),
    "runtime": frozenset({"store"}),
    "extract": frozenset({"store", "runtime"}),
    "analyze": frozenset({"store", "runtime"}),
    "train": frozenset({"store", "runtime", "extract"}),
    "cluster": frozenset({"store", "runtime", "extract", "analyze", "train"}),
    "cli": _BELOW_CLI,
    "__main__": _BELOW_CLI | {"cli"},
}
ANALYZE_RANKS = {"accumulators": 0, "metrics": 1, "streaming": 1, "config": 2, "local": 3, "pair": 4, "results": 5,
                 "report": 6, "job": 7, "cli": 8, "__init__": 9}
# Package code that is not the package (its guards do not apply either).
NOT_THE_PACKAGE = {"tests", "benchmarks", "configs", ".venv", "build"}


def module_names(root: Path) -> dict[str, Path]:
    """``hrsa.x.y`` -> file, for every module of the package (tests, benchmarks and configs are not the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in NOT_THE_PACKAGE or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["hrsa", *parts])] = path
    return out


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> Iterator[tuple[str, int]]:
    """Every hrsa module that ``name`` imports, with the line, resolved to a module of the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
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
            targets = dynamic_imports(node, is_init=path.name == "__init__.py", tree=tree)
        for target in targets:
            while target and target not in modules:  # "import hrsa.store.errors as e" -> that module
                target = target.rpartition(".")[0]
            if target.startswith("hrsa") and target != name:
                yield target, node.lineno


def dynamic_imports(node: ast.AST, *, is_init: bool, tree: ast.Module) -> list[str]:
    """Modules ``node`` imports at run time: ``import_module("hrsa.x")`` / ``__import__("hrsa.x")``, or (``node``
    being an ``__init__``'s module-level ``_LAZY = {...}``) the table's module names."""
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        first = node.args[0].value
        if called in ("import_module", "__import__") and isinstance(first, str) and first.startswith("hrsa."):
            return [first]
    if is_init and isinstance(node, (ast.Assign, ast.AnnAssign)) and node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if "_LAZY" in names and isinstance(node.value, ast.Dict):
            return [v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def folder(name: str) -> str:
    """``hrsa.analyze.pair`` -> ``analyze``; ``hrsa.cli`` -> ``cli``; ``hrsa`` -> ``hrsa``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "hrsa"


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
        where = path.relative_to(root)
        f_from = folder(name)
        if f_from not in ALLOWED_IMPORTS:
            problems.append(f"{f_from}/: a folder not in ALLOWED_IMPORTS; add it with what it may import")
            continue
        for target, line in imports_of(name, path, modules):
            f_to = folder(target)
            if f_to not in (f_from, "hrsa") and f_to not in ALLOWED_IMPORTS[f_from]:
                problems.append(f"{where}:{line}: {name} imports {target} ({f_from} may not import {f_to})")
                continue
            a_from, a_to = analyze_layer(name), analyze_layer(target)
            if a_from and a_to and a_from[0] != a_to[0] and a_to[1] >= a_from[1]:
                problems.append(f"{where}:{line}: {name} imports {target} "
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


def write_tree(root: Path, files: Mapping[str, str]) -> Path:
    """A package tree under ``root``: each file's code, and an empty __init__.py in every folder above it."""
    for rel, code in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
        for parent in path.relative_to(root).parents:
            (root / parent / "__init__.py").touch()
    return root


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
    assert upward_imports(write_tree(tmp_path, FORMER_LOOPS[loop])), f"{loop}: no upward import found"


def test_checker_finds_a_loop_inside_one_folder(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"train/a.py": "from hrsa.train.b import g\n",
                                 "train/b.py": "def g():\n    from hrsa.train import a\n"})
    assert not upward_imports(root)  # a folder may import itself...
    assert import_cycles(root) == [["hrsa.train.a", "hrsa.train.b"]]  # ...but not in a loop


@pytest.mark.parametrize("code", ["from hrsa.analyze.job import run_analysis\n",
                                  "def f():\n    import hrsa.analyze.pair as p\n",
                                  "import importlib\ndef f():\n    importlib.import_module('hrsa.analyze.job')\n",
                                  "def f():\n    return __import__('hrsa.analyze.job')\n"],
                         ids=["import", "in-function", "import_module", "__import__"])
def test_checker_refuses_train_importing_analyze(tmp_path: Path, code: str) -> None:
    root = write_tree(tmp_path, {"train/trainer.py": code, "analyze/job.py": "x = 1\n", "analyze/pair.py": "x = 1\n"})
    (problem,) = upward_imports(root)
    assert problem.startswith("train/trainer.py:") and "(train may not import analyze)" in problem


def test_checker_counts_an_init_s_lazy_table(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"extract/job.py": "x = 1\n", "cluster/runner.py": "x = 1\n"})
    (root / "extract" / "__init__.py").write_text('_LAZY = {"run": "hrsa.cluster.runner", "job": "hrsa.extract.job"}\n')
    assert upward_imports(root) == ["extract/__init__.py:1: hrsa.extract imports hrsa.cluster.runner "
                                    "(extract may not import cluster)"]


def test_checker_asks_where_a_new_folder_belongs(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"serve/app.py": "from hrsa.store.errors import UserError\n", "store/errors.py": ""})
    assert upward_imports(root) == ["serve/: a folder not in ALLOWED_IMPORTS; add it with what it may import"]


# -- guards: the store's layout and the Ray connection each live in one place ----------------------------------
RAY_CONNECTION = "runtime/connection.py"
LAYOUT_PREFIXES = ("corpora/", "models/", "results/")
LAYOUT_NAMES = ("units", "token_ids")


def package_trees(root: Path) -> Iterator[tuple[Path, ast.Module]]:
    """(path relative to ``root``, syntax tree) of every module of the package (not tests/, not benchmarks/)."""
    for path in module_names(root).values():
        yield path.relative_to(root), ast.parse(path.read_text(), str(path))


def ray_inits(root: Path) -> list[str]:
    """Every ``ray.init(...)`` call outside the one Ray connection."""
    return [f"{rel}:{node.lineno}: ray.init( outside {RAY_CONNECTION}; connect with hrsa.runtime.connection.connect"
            for rel, tree in package_trees(root) if rel.as_posix() != RAY_CONNECTION
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"]


def layout_paths(root: Path) -> list[str]:
    """Store layout paths outside store/: string literals (f-string parts too) naming the hierarchy, and
    ``.group("...")`` calls (``click.group`` names a command, not a Zarr group)."""
    problems: list[tuple[Path, int, str]] = []
    for rel, tree in package_trees(root):
        if rel.parts[0] == "store":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value.startswith(LAYOUT_PREFIXES) or node.value in LAYOUT_NAMES):
                problems.append((rel, node.lineno, f"the store path {node.value!r} outside store/"))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "group"
                  and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "click")
                  and any(isinstance(a, ast.JoinedStr) or isinstance(a, ast.Constant) and isinstance(a.value, str)
                          for a in node.args)):
                problems.append((rel, node.lineno, ".group(...) of a store path outside store/"))
    return [f"{rel}:{line}: {what}; use or add an ActivationStore method" for rel, line, what in sorted(problems)]


def test_ray_is_initialised_only_by_the_one_connection() -> None:
    problems = ray_inits(ROOT)
    assert not problems, "\n".join(problems)


def test_the_store_layout_is_read_only_inside_store() -> None:
    problems = layout_paths(ROOT)
    assert not problems, "\n".join(problems)


def test_guards_catch_what_they_guard(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {
        "runtime/connection.py": "import ray\nray.init()\n",
        "store/verify.py": "def f(store, cid):\n    return store.group(f'corpora/{cid}')['units']\n",
        "extract/worker.py": "import ray\ndef f():\n    ray.init(address='auto')\n",
        "analyze/results.py": "def f(store, run_id):\n    store.group('results')\n    return f'results/{run_id}'\n",
        "train/data.py": "def f(group):\n    return group['token_ids'], 'tokens/units' , 'models', match.group(1)\n",
        "cluster/cli.py": "import click\n@click.group('run')\ndef run():\n    pass\n",
    })
    assert ray_inits(root) == ["extract/worker.py:3: ray.init( outside runtime/connection.py; connect with "
                               "hrsa.runtime.connection.connect"]
    found = [p.partition(";")[0] for p in layout_paths(root)]
    assert found == ["analyze/results.py:2: .group(...) of a store path outside store/",
                             "analyze/results.py:3: the store path 'results/' outside store/",
                             "train/data.py:2: the store path 'token_ids' outside store/"]
