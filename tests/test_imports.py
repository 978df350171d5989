"""The import graph of the package has no cycles: each module can be read, tested and left
out of a build on its own. Lazy imports (inside functions) count when they cross from one
capability package to another (daemon <-> spot, config <-> a section); inside one package
a lazy import that splits a big module is its own business. ``TYPE_CHECKING`` imports do
not count (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "guestagent"


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    base = ROOT / module.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imports(tree: ast.AST, here: str, lazy: bool = False) -> set[str]:
    out: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        found: set[str] = set()
        if isinstance(node, ast.Import):
            found = {a.name for a in node.names if a.name.startswith("guestagent")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("guestagent"):
            assert node.module is not None
            found = {node.module} | {f"{node.module}.{a.name}" for a in node.names
                                     if _exists(f"{node.module}.{a.name}")}
        if lazy:
            found = {m for m in found if _package(m) != _package(here)}
        out |= found
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        out |= _imports(node, here, inner)
    return out


def graph() -> dict[str, set[str]]:
    """Module -> modules it imports. A module importing the package it lives in (its
    ``__init__``, which may re-export it) is left out: that is how packages are made."""
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        name = _name(path)
        edges[name] = {m for m in _imports(ast.parse(path.read_text()), name)
                       if m != name and not name.startswith(m + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = _pop_component(stack, on, v)
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def _pop_component(stack: list[str], on: set[str], root: str) -> list[str]:
    """The modules above and including ``root`` on the stack: one component."""
    comp = []
    while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == root:
            return comp


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_capabilities_do_not_import_the_daemon() -> None:
    # Only the daemon's registry names capabilities; no capability reaches back up (the
    # service contract, drain and throttle live below both). config gathers every section.
    edges = graph()
    top = ("guestagent.daemon", "guestagent.cli", "guestagent.localcloud", "guestagent.config",
           "guestagent.demo")
    up = {m: sorted(d for d in deps if d.startswith("guestagent.daemon"))
          for m, deps in edges.items() if not m.startswith(top)}
    assert {m: d for m, d in up.items() if d} == {}
