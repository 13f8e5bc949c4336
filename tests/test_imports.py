"""The package's import graph: no cycles (function-level imports included), each floor imports only
the floors below it, and nothing edits sys.path (notebooks and scripts import the installed package)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "models", "engine", "server", "benchmarks", "sharding")
# A floor imports only floors below it; sharding is used by every floor and uses only the kernels.
BELOW = {"pallas_kernels": set(), "sharding": {"pallas_kernels"}, "models": {"pallas_kernels", "sharding"},
         "engine": {"pallas_kernels", "sharding", "models"},
         "server": {"pallas_kernels", "sharding", "models", "engine"},
         "benchmarks": {"pallas_kernels", "sharding", "models", "engine", "server"}}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module in the packages."""
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its file}."""

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" for a in node.names}
        graph[module] = {t for t in map(owner, targets) if t and t != module}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None (depth-first search for a back edge)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    assert cycle(import_graph(module_files())) is None


def test_each_floor_imports_only_the_floors_below_it():
    upward = [(m, t) for m, targets in import_graph(module_files()).items() for t in targets
              if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in BELOW[m.split(".")[0]]]
    assert upward == []


@pytest.mark.parametrize("folder", ["notebooks", "scripts", "tests", *PACKAGES])
def test_nothing_edits_sys_path(folder):
    """Notebooks, scripts and tests import the installed package, never a folder put on sys.path."""
    edits = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")
             if "sys.path" in p.read_text() and p.name != "test_imports.py"]
    assert edits == []
