"""The package's layers run one way: no folder or top-level module of ``deepfake_dist`` imports
one that imports it back (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "deepfake_dist"


def _part(module: str) -> str | None:
    """The folder or top-level module of the package that ``module`` lies in, if any."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name or len(parts) < 2:
        return None
    name = parts[1]
    return name if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file() else None


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports; ``from X import y`` also names ``X.y``, which may be a module."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, dict[str, list[str]]]:
    """part -> imported part -> the files that import it."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if source is None:  # the package's own __init__.py
            continue
        for module in _imported(path):
            target = _part(module)
            if target and target != source:
                graph.setdefault(source, {}).setdefault(target, []).append(str(path.relative_to(PACKAGE)))
    return graph


def test_no_two_parts_of_the_package_import_each_other():
    graph = import_graph()
    assert "tasks" in graph["train"] and "engine" in graph["tasks"]  # the parse sees the layers
    both = [f"{a} <-> {b} ({sorted(set(graph[a][b]))[0]}, {sorted(set(graph[b][a]))[0]})"
            for a in sorted(graph) for b in sorted(graph[a]) if a < b and a in graph.get(b, {})]
    assert not both, "parts that import each other: " + "; ".join(both)
