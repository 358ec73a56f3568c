"""The import rules of docs/ARCHITECTURE.md, checked on the source (``ast``), function-level imports included.

- ``attentions`` imports nothing from ``tasks`` or ``harness``; ``tasks`` nothing from ``harness``.
- Inside ``harness`` data flows one way: run (train, bench) -> store -> analysis -> report;
  each room imports only the rooms listed in :data:`ALLOWED` (its module docstring says the same).
- No import cycle between modules anywhere, counting imports inside functions.
- No function in ``harness`` is longer than 60 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attentions", "tasks", "harness")
MAX_FUNCTION_LINES = 60

# Room -> the project rooms it may import (itself always allowed). A room is a top-level package, or a
# harness module / subpackage. Third-party imports are not restricted here.
ALLOWED: dict[str, set[str]] = {
    "attentions": set(),
    "tasks": {"attentions"},  # the shared config type checker (attentions.config_types)
    "harness": {"harness.store"},  # the package re-exports the store's API (lazily)
    "harness.settings": set(),
    "harness.measure": {"attentions"},
    "harness.allocator": set(),
    "harness.store": set(),
    "harness.checkpoint": set(),
    "harness.schedules": set(),
    "harness.analysis": set(),
    "harness.display": {"harness.analysis"},
    "harness.model": {"attentions"},
    "harness.generate": {"attentions", "harness.model", "harness.checkpoint", "harness.plugins"},
    "harness.plugins": {"attentions", "tasks"},
    "harness.overhead": {"tasks", "harness.model"},
    "harness.precision": {"attentions"},
    "harness.train": {"attentions", "tasks", "harness.model", "harness.schedules", "harness.checkpoint",
                      "harness.measure", "harness.allocator", "harness.store", "harness.display", "harness.settings",
                      "harness.plugins"},
    "harness.bench": {"attentions", "harness.measure", "harness.allocator", "harness.store", "harness.analysis",
                      "harness.display", "harness.settings", "harness.plugins", "harness.model"},
    "harness.report": {"attentions", "harness.store", "harness.analysis", "harness.display", "harness.plugins",
                       "harness.settings"},
    "harness.suite": {"attentions", "harness.bench", "harness.report", "harness.display", "harness.measure",
                      "harness.settings", "harness.plugins"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (module level and inside functions).

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``;
    relative imports are resolved against the importing module's package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "harness.bench.run.x" -> nearest project module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "harness" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_harness_room_is_listed():
    rooms = {room(m) for m in project_modules()}
    assert rooms <= set(ALLOWED), f"add {sorted(rooms - set(ALLOWED))} to ALLOWED and docs/ARCHITECTURE.md"


def test_imports_follow_the_layers():
    bad = []
    for module, targets in import_graph().items():
        for target in targets:
            src, dst = room(module), room(target)
            if src != dst and dst not in ALLOWED[src]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle_and_a_function_level_import(tmp_path):
    # The checker itself must be able to fail: a two-module cycle through an import inside a function.
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from harness import bench\n    import attentions.full\n")
    modules = {"harness": path, "harness.bench": path, "attentions": path, "attentions.full": path, "m": path}
    assert imported_modules("m", path, modules) == {"harness.bench", "attentions.full"}


@pytest.mark.parametrize("path", sorted((ROOT / "harness").rglob("*.py")), ids=lambda p: module_name(p))
def test_harness_functions_are_short(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in functions
            if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long
