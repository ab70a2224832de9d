"""The layering rules of docs/architecture.md, read from the source tree (no imports of mmfast).

Every ``import`` statement of the package counts, at module or function level: ``mmfast/`` and
``kernels/`` (installed as ``mmfast.triton``). A package's ``__init__`` is not an edge of its own
submodules' imports (Python loads it first anyway); a name imported from a package is.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_LINES = 600


def _modules() -> dict[str, str]:
    mods = {}
    for top, name in (("mmfast", "mmfast"), ("kernels", "mmfast.triton")):
        base = os.path.join(ROOT, top)
        for d, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(d, f)
                rel = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                mod = name if rel == "__init__" else f"{name}.{rel.removesuffix('.__init__')}"
                mods[mod] = path
    return mods


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].endswith("__init__.py")


def _owner(name: str) -> str | None:
    """The module that ``name`` (a dotted path) lives in: itself, or the nearest parent."""
    while name not in MODULES:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def _imports(mod: str):
    """(target module, imported name or None, line) for every import of ``mod`` into mmfast."""
    tree = ast.parse(open(MODULES[mod]).read(), MODULES[mod])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mmfast"):
                    yield _owner(alias.name), None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = mod.split(".")
                parts = parts if _is_package(mod) else parts[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("mmfast"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:
                    yield full, None, node.lineno
                else:
                    yield _owner(base), alias.name, node.lineno


def _edges() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for mod in MODULES:
        for target, _, _ in _imports(mod):
            if target is None or target == mod:
                continue
            edges[mod].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in sorted(MODULES):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_scan_sees_the_package():
    # A scan that found nothing would pass every rule below.
    assert {"mmfast", "mmfast.ops.registry", "mmfast.patch.timm", "mmfast.triton.tome"} <= set(MODULES)
    edges = _edges()
    assert "mmfast.ops.registry" in edges["mmfast.ops.window_attention"]


def test_cycle_finder_finds_a_cycle():
    global MODULES
    saved = MODULES
    MODULES = {m: "" for m in "abcd"}
    try:
        assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
        assert _cycles({"a": {"b"}, "b": {"c"}}) == []
    finally:
        MODULES = saved


def test_no_import_cycles():
    edges = _edges()
    cycles = _cycles(edges)
    assert not cycles, "\n".join(
        " <-> ".join(c) + "\n  edges: " + ", ".join(f"{a}->{b}" for a in c for b in sorted(edges[a]) if b in c)
        for c in cycles)


def test_no_private_names_cross_modules():
    crossings = [
        f"{MODULES[mod]}:{line}: {name} from {target}"
        for mod in MODULES
        for target, name, line in _imports(mod)
        if name is not None and name.startswith("_") and not name.startswith("__") and target != mod
    ]
    assert not crossings, "\n".join(crossings)


def _imports_outside(layer: str, allowed: tuple[str, ...]) -> list[str]:
    """Every import of a module of ``layer`` (a dotted prefix) whose target is not under ``allowed``."""
    return [
        f"{MODULES[mod]}:{line}: imports {target}"
        for mod in MODULES
        if mod.startswith(layer)
        for target, _, line in _imports(mod)
        if target is not None and not target.startswith(allowed)
    ]


def test_kernels_import_nothing_above_them():
    # mmfast.triton is the bottom layer: the op layer checks availability and validates arguments.
    above = _imports_outside("mmfast.triton", ("mmfast.triton",))
    assert not above, "\n".join(above)


def test_patch_layer_talks_to_functional_and_nn_only():
    skips = _imports_outside("mmfast.patch", ("mmfast.patch", "mmfast.functional", "mmfast.nn"))
    assert not skips, "\n".join(skips)


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if not m.startswith("mmfast.triton")))
def test_no_python_file_over_600_lines(mod):
    with open(MODULES[mod]) as f:
        n = sum(1 for _ in f)
    assert n <= MAX_LINES, f"{os.path.relpath(MODULES[mod], ROOT)} has {n} lines; split it along its seams"
