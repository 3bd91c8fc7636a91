"""The house's floor plan, checked: imports point one way and never in a circle.

cli → tuning → train → serve → data → (shared pipelines modules) → msmae; comparison → msmae.
Imports inside function bodies count too: a circle hidden in a function is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("msmae", "comparison", "pipelines", "tuning", "msmae_cli")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for file in (REPO / package).rglob("*.py"):
            out[".".join(file.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = file
    return out


MODULES = _modules()


def _imports(name: str, file: Path) -> set[str]:
    """Project modules ``name`` imports, anywhere in the file (``from pkg import mod`` resolved to the module)."""
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, file) for name, file in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "pipelines":
        return parts[0]
    if len(parts) > 1 and parts[1] in ("data", "train", "serve"):
        return f"pipelines.{parts[1]}"
    return "pipelines" if len(parts) == 1 else "pipelines.shared"


# Which layers each layer may import (its own included): the one-way floor plan of the README.
ALLOWED = {
    "msmae": {"msmae"},
    "comparison": {"comparison", "msmae"},
    "pipelines.shared": {"pipelines.shared", "msmae"},
    "pipelines.data": {"pipelines.data", "pipelines.shared", "msmae"},
    "pipelines.serve": {"pipelines.serve", "pipelines.data", "pipelines.shared", "msmae"},
    "pipelines.train": {"pipelines.train", "pipelines.serve", "pipelines.data", "pipelines.shared", "msmae"},
    "pipelines": set(),
    "tuning": {"tuning", "pipelines.train", "pipelines.serve", "pipelines.data", "pipelines.shared", "msmae"},
    "msmae_cli": {"msmae_cli", "tuning", "pipelines.train", "pipelines.serve", "pipelines.data", "pipelines.shared", "msmae"},
}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_the_project():
    assert _cycles(GRAPH) == []


def test_the_walk_sees_the_rooms():
    """Guard against a walk that finds nothing (and so passes everything)."""
    rooms = {_layer(m) for m in MODULES}
    assert {"pipelines.data", "pipelines.train", "pipelines.serve", "pipelines.shared"} <= rooms
    assert "pipelines.data.streams" in GRAPH["pipelines.train.launcher"]
    assert "pipelines.serve.registry" in GRAPH["pipelines.train.finish"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    layer = _layer(module)
    wrong = sorted(m for m in GRAPH[module] if _layer(m) not in ALLOWED[layer])
    assert not wrong, f"{module} ({layer}) imports {wrong}, which sit above it"


def test_each_room_says_what_lives_there():
    for room in ("pipelines", "pipelines.data", "pipelines.train", "pipelines.serve"):
        doc = ast.get_docstring(ast.parse(MODULES[room].read_text()))
        assert doc and len(doc) > 80, f"{room}/__init__.py needs a docstring saying what lives there"
