"""The package's layout rules: no import circle, model/ imports nothing above it, no import hidden in a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dynasearch"
# anything may import these
LEAVES = {"dynasearch.checks", "dynasearch.errors", "dynasearch.fileio", "dynasearch.version"}
OPTIONAL_EXTRAS = {"diffusers", "tensorboard", "torch_fidelity", "psycopg", "sqlalchemy"}
LAZY_MODULES = {"torch._dynamo", "torch.utils.tensorboard"}
"""Imported where used: dynamo costs 1.2 s at import and only --compile needs it; the writer needs the extra."""


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.Try):  # optional imports at module level
            out.extend(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def _edges(module: str, path: Path) -> set[str]:
    """The dynasearch modules `module` imports when it is imported (TYPE_CHECKING blocks excluded)."""
    out: set[str] = set()
    for node in _top_level_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
            continue
        target = _absolute(module, path, node)
        if not target.startswith("dynasearch"):
            continue
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            out.add(sub if sub in MODULES else target)
    out.discard(module)
    return out


GRAPH = {m: _edges(m, p) for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_the_layout_checker_sees_the_package():
    assert len(MODULES) > 40
    assert "dynasearch.model.dit" in GRAPH["dynasearch.slicing"]
    assert "dynasearch.model.subnet" in GRAPH["dynasearch.model.dit"]


def test_no_module_imports_another_in_a_circle():
    assert _cycles() == []


def test_the_checker_finds_a_circle(monkeypatch):
    monkeypatch.setitem(GRAPH, "dynasearch.model.subnet", GRAPH["dynasearch.model.subnet"] | {"dynasearch.model.dit"})
    assert ["dynasearch.model.dit", "dynasearch.model.subnet"] in _cycles()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("dynasearch.model")))
def test_model_imports_nothing_outside_model(module):
    outside = {m for m in GRAPH[module] if not m.startswith("dynasearch.model") and m not in LEAVES}
    assert outside == set(), f"{module} imports {sorted(outside)}"


def _function_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    top = {id(n) for n in _top_level_imports(tree)}
    guarded = {id(n) for node in ast.walk(tree) if _type_checking(node) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and id(node) not in guarded:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            if not all(n.split(".")[0] in OPTIONAL_EXTRAS or n in LAZY_MODULES for n in names) or (
                isinstance(node, ast.ImportFrom) and node.level
            ):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_import_hides_in_a_function_outside_the_cli():
    hidden = [f for m, p in MODULES.items() if not m.startswith("dynasearch.cli") for f in _function_imports(p)]
    assert hidden == []
