"""The shape of ``deepfake_dist/data``: no module imports one that imports it back, and every
source kind in ``data/sources/`` is in the one list that registers them."""

from __future__ import annotations

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "deepfake_dist" / "data"


def _module_name(path: Path) -> str:
    parts = path.relative_to(DATA.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the data package it imports, as written: at the top, in a
    function or under ``TYPE_CHECKING`` (a lazy import only hides a cycle). ``from P import m``
    counts as importing ``P.m`` when that is a module."""
    modules = {_module_name(p): p for p in sorted(DATA.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 packages
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once all it reaches is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_data_package():
    graph = import_graph()
    # the parse sees the imports it must (else an empty graph would pass)
    assert "deepfake_dist.data.shard_writer" in graph["deepfake_dist.data.prepare"]
    assert "deepfake_dist.data.common" in graph["deepfake_dist.data.handoff"]
    assert "deepfake_dist.data.faces" in graph["deepfake_dist.data.sources.videos"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_every_source_module_is_registered():
    """A source kind is a module in ``data/sources/`` plus its line in ``SOURCES``: a module
    whose line is missing is a kind ``--source`` cannot reach. ``base`` and ``video_sets`` hold
    what kinds share."""
    from deepfake_dist.data.sources import SOURCES

    registered = {SOURCES.get(kind).__module__ for kind in SOURCES.names()}
    shared = ("__init__", "base", "video_sets")
    modules = {_module_name(p) for p in (DATA / "sources").glob("*.py") if p.stem not in shared}
    assert modules == registered
