"""The package layout's import rules: one package per stage, imports flowing one way, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which top-level packages each package may import (itself always allowed).
ALLOWED = {
    "orchestrator": {"actors"},
    "actors.generate": {"actors.store", "actors.sae"},
    "actors.train": {"actors.store", "actors.sae", "actors.generate"},  # generate.models: the LM-loss evaluation
    "actors.compare": {"actors.store", "actors.sae"},
    "actors.store": {"actors.sae"},
    "actors.sae": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the project modules a file imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("actors", "orchestrator")}


def owner(module: str) -> str | None:
    for package in sorted(ALLOWED, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return None


SOURCES = sorted(p for d in ("actors", "orchestrator") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    package = owner(module_name(path))
    if package is None:  # actors/__init__.py
        return
    for target in imported_modules(path):
        target_package = owner(target)
        if target_package is None or target_package == package:
            continue
        assert any(target_package == a or target_package.startswith(a + ".") for a in ALLOWED[package]), (
            f"{path.relative_to(ROOT)} imports {target}: {package} may import only {sorted(ALLOWED[package])}")


def test_no_import_cycles_between_modules():
    """Module-level import graph (lazy imports inside functions count too) has no cycle."""
    names = {module_name(p): p for p in SOURCES}
    graph = {n: {t for t in imported_modules(p) if t in names and t != n} for n, p in names.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
