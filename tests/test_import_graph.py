"""The import rules of ``docs/architecture.md``, checked: imports point down the layers, and the
modules' top-level imports form no cycle.

Every ``fabric`` module belongs to one *unit* (a package, or a sub-package of ``fabric.kvbm``),
and every unit to one layer of ``LAYERS``. A module may import modules of its own unit and of
lower layers, never of its own layer's other units or of higher layers; this holds for every
import, including those inside functions and under ``TYPE_CHECKING``. ``__main__`` modules are
entry points and may import anything.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import fabric

ROOT = Path(fabric.__file__).parent

LAYERS: list[set[str]] = [
    {"errors"},
    {"settings", "auth"},
    {"transfer", "signal", "discovery"},
    {"kvbm.core"},
    {"kvbm.tiers"},
    {"kvbm.shared"},
    {"kvbm.base"},  # config, manager, metrics, remote, sequence
    {"kvbm.stream", "kvbm.offload"},
    {"kvbm.face"},  # fabric.kvbm (the public face) and fabric.kvbm.build
    {"models", "pd", "node"},
    {"engine", "frontend", "supervise", "config"},
    {"worker", "integrations"},
    {"launch", "demo", "status"},
    {"bench"},
    {"cli", "fabric"},
]
"""Lowest first."""

_KVBM_FACE = {"fabric.kvbm", "fabric.kvbm.build"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The unit ``module`` belongs to (module docstring)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "fabric"
    if parts[1] != "kvbm":
        return parts[1]
    if module in _KVBM_FACE:
        return "kvbm.face"
    if len(parts) > 2 and (ROOT / "kvbm" / parts[2]).is_dir():
        return f"kvbm.{parts[2]}"
    return "kvbm.base"


def _layer_of(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"unit {unit!r} is in no layer: add it to LAYERS and the docs")


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(every fabric module ``path`` imports, those imported at module level outside
    ``TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    everything: set[str] = set()
    top: set[str] = set()

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from fabric.kvbm import tiers`` may name a submodule: count both.
            found = [node.module]
            found += [f"{node.module}.{a.name}" for a in node.names]
            return found
        return []

    for node in ast.walk(tree):
        everything.update(n for n in names(node) if n.split(".")[0] == "fabric")
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        top.update(n for n in names(node) if n.split(".")[0] == "fabric")
    return everything, top


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    every: dict[str, set[str]] = {}
    top: dict[str, set[str]] = {}
    for name, path in modules.items():
        e, t = _imports(path)
        every[name] = {m for m in e if m in modules}
        top[name] = {m for m in t if m in modules}
    return every, top


def upward_imports(every: dict[str, set[str]]) -> list[str]:
    """The imports of ``every`` (module -> modules it imports) that break the layering."""
    upward = []
    for module, targets in sorted(every.items()):
        if module.endswith("__main__"):
            continue
        unit = unit_of(module)
        for target in sorted(targets):
            other = unit_of(target)
            if other != unit and _layer_of(other) >= _layer_of(unit):
                upward.append(f"{module} ({unit}) imports {target} ({other})")
    return upward


def find_cycle(top: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module-level imports in ``top`` (module -> modules it imports), or None.

    Importing ``a.b.c`` runs ``a.b``'s ``__init__`` too: an edge to every package on the path.
    """
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in top.items():
        for target in targets:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in top and prefix != module and not module.startswith(prefix + "."):
                    edges[module].add(prefix)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(top):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_imports_point_down_the_layers() -> None:
    upward = upward_imports(_graph()[0])
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_module_level_imports_have_no_cycle() -> None:
    cycle = find_cycle(_graph()[1])
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    every, _ = _graph()
    for module in every:
        _layer_of(unit_of(module))  # every unit has a layer
    assert unit_of("fabric.kvbm.build") == unit_of("fabric.kvbm") == "kvbm.face"
    assert unit_of("fabric.kvbm.manager") == "kvbm.base"
    assert upward_imports({"fabric.kvbm.core.pool": {"fabric.kvbm.manager"}}) == [
        "fabric.kvbm.core.pool (kvbm.core) imports fabric.kvbm.manager (kvbm.base)"
    ]
    assert upward_imports({"fabric.pd.reader": {"fabric.kvbm.remote"}}) == []
    assert upward_imports({"fabric.pd.reader": {"fabric.models.presets"}})  # same layer
    assert upward_imports({"fabric.worker.__main__": {"fabric.cli"}}) == []
    modules = {"fabric.a": set(), "fabric.a.x": {"fabric.b.y"}, "fabric.b": set()}
    assert find_cycle({**modules, "fabric.b.y": set()}) is None
    cycle = find_cycle({**modules, "fabric.b.y": {"fabric.a.x"}})
    assert (
        cycle is not None and cycle[0] == cycle[-1] and {"fabric.a.x", "fabric.b.y"} <= set(cycle)
    )
