"""The package is its architecture: one subpackage per layer, imports only downwards and of public names across
packages, no import circle inside a layer, no module over 600 lines, no function over 80 lines unless it is one
readable sequence, and the Layout table names exactly the modules that exist."""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "targetsft"
# layer → the layers its modules may import (every import counts, function-level ones included)
ALLOWED = {
    "runtime": {"runtime"},
    "losses": {"losses"},
    "data": {"data", "runtime"},
    "training": {"training", "losses", "data", "runtime"},
    "evaluation": {"evaluation", "data", "runtime"},
    "prep": {"prep", "training", "evaluation", "losses", "data", "runtime"},
    "experiments": {"experiments", "prep", "training", "evaluation", "losses", "data", "runtime"},
    "cli": {"cli", "experiments", "prep", "training", "evaluation", "losses", "data", "runtime", "<root>"},
}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "<root>"


def _imports(path: Path) -> set[str]:
    """Every ``targetsft...`` module a file imports (``from targetsft import x`` counts as ``targetsft.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("targetsft")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("targetsft"):
            out |= {f"{node.module}.{a.name}" if node.module == "targetsft" else node.module for a in node.names}
    return out


def test_no_layer_imports_a_higher_one():
    bad = []
    for module, path in _modules().items():
        layer = _layer(module)
        if layer == "<root>":
            continue  # the public API (targetsft, functional) and the old-path aliases re-export the layers
        for imported in _imports(path):
            target = "<root>" if imported == "targetsft.__version__" else _layer(imported)
            if target not in ALLOWED[layer]:
                bad.append(f"{module} ({layer}) imports {imported} ({target})")
    assert not bad, "\n".join(bad)


def _subpackage(module: str) -> str:
    """The package a module belongs to (``targetsft.training.teacher_cache.read``: ``...training.teacher_cache``)."""
    return module.rpartition(".")[0]


def test_no_private_name_is_imported_across_packages():
    """A ``_name`` is its package's own: another package imports only public names (the shared helper is public and
    lives in the layer that owns it)."""
    bad = []
    for module, path in _modules().items():
        here = _subpackage(module) if not path.name == "__init__.py" else module
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("targetsft"):
                is_package = (PACKAGE.parent / node.module.replace(".", "/")).is_dir()
                owner = node.module if is_package else _subpackage(node.module)
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and owner != here:
                        bad.append(f"{module} imports {node.module}.{alias.name}")
    assert not bad, "\n".join(bad)


def test_no_module_over_600_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"


def test_no_function_over_80_lines_unless_it_says_it_is_one_readable_sequence():
    """A function of more than 80 lines (its ``def`` to its last line, docstring included) is split by job, or its
    docstring says it is "one readable sequence" (an argument parser, a call laid out one step per line)."""
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                doc = " ".join((ast.get_docstring(node) or "").split())
                if "one readable sequence" not in doc.lower():
                    long.append(f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"functions over 80 lines: {long}"


def test_layout_table_names_every_module():
    """Each row of the layout table (docs/architecture.md) names a subpackage and its modules; together they are
    exactly the tree."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("| package | modules | holds |") :]
    listed = set()
    for package, modules in re.findall(r"^\| `targetsft(?:\.([a-z_.]+))?` \| ([^|]+) \|", table, flags=re.M):
        for name in re.findall(r"`([a-z_]+)`", modules):
            listed.add(f"targetsft.{package}.{name}" if package else f"targetsft.{name}")
    actual = {m for m in _modules() if not m.endswith("__main__") and m.count(".") >= 1}
    actual -= {m for m in actual if m.split(".")[-1] in ALLOWED or m == "targetsft._compat"}  # package inits
    missing, gone = sorted(actual - listed), sorted(listed - actual)
    assert listed == actual, f"missing from docs/architecture.md: {missing}; gone: {gone}"


def test_old_import_paths_still_work_for_one_release():
    """``targetsft.loss`` and the other flat paths of 0.1 give the very module at its new path, with a warning."""
    import importlib
    import sys
    import warnings

    from targetsft import _compat

    for old, new in _compat.MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
        assert module.__spec__.name == new  # the real module keeps its own spec
    from targetsft.teacher_cache import TeacherCache  # noqa: F401  a name through an old path


def _module_graph() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports, at the top or inside a function (an
    import deferred into a function still ties the two); ``from a import b`` counts as ``a.b`` where that is a
    module, else as ``a``."""
    modules = _modules()

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("targetsft")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("targetsft"):
                deps |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[module] = deps - {module, ""}
    return graph


def test_no_import_circle_inside_a_layer():
    """Within a layer (``targetsft.training`` with ``training.teacher_cache``, ...) the modules import one another
    without a circle: each can be read after the ones it uses."""

    graph = _module_graph()
    for layer in sorted({_layer(m) for m in graph} - {"<root>"}):
        inside = {m: {d for d in deps if _layer(d) == layer} for m, deps in graph.items() if _layer(m) == layer}
        try:
            tuple(graphlib.TopologicalSorter(inside).static_order())
        except graphlib.CycleError as err:
            pytest.fail(f"an import circle in targetsft.{layer}: {' -> '.join(err.args[1])}")
