"""The package layout keeps its layers: checked statically on the source (ast), nothing is imported.

Layers, bottom to top: phi3v.engine (with phi3v.kernels and phi3v.quant under / beside it), the
facade phi3v.api, the entry points phi3v.cli, phi3v.server, phi3v.batch and phi3v.bench.

- The engine, kernels and quant never import an entry point or the facade (not even inside a
  function); the kernels import nothing from the engine or quant either.
- No import circle among phi3v modules: the graph has an edge A -> B for every import of B in A,
  at module level or inside functions; relative imports are resolved; `from pkg import sub` of a
  submodule is an edge to pkg.sub, and a package's __init__ importing (re-exporting) a submodule
  is an edge from the package.
- Every phi3v import names a module that exists (a file moved without its importers fails here,
  not when the one command that imports it lazily runs).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "phi3v"
ENGINE_LAYERS = ("phi3v.engine", "phi3v.kernels", "phi3v.quant")
ENTRY_POINTS = ("phi3v.cli", "phi3v.server", "phi3v.batch", "phi3v.bench", "phi3v.eval")


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every .py under src/phi3v (a package is its __init__)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of every import in the file, relative ones resolved.

    `from X import a` gives X.a when that is a module of ours (a submodule import), else X.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):  # every node: imports inside functions and classes count too
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.append((sub if sub in MODULES else base, node.lineno))
    return names


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the phi3v modules it imports, [unresolvable phi3v imports as 'module:line -> name'])."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    missing = []
    for module, path in MODULES.items():
        for name, line in imported_names(module, path):
            if name != "phi3v" and not name.startswith("phi3v."):
                continue  # the standard library and third-party packages
            if name in MODULES:
                if name != module:
                    graph[module].add(name)
            else:
                missing.append(f"{module}:{line} -> {name}")
    return graph, missing


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of one module without a self-edge are left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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
    return sorted(found)


def in_layer(module: str, layers: tuple[str, ...]) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


# ---- the checker itself ---------------------------------------------------------------------


def test_checker_resolves_imports_and_finds_circles(tmp_path, monkeypatch):
    """On a made-up package: relative imports, imports in functions, re-exports, one circle."""
    root = tmp_path / "phi3v"
    files = {
        "__init__.py": "from .errors import E\n",
        "errors.py": "class E(Exception): pass\n",
        "engine/__init__.py": "",
        "engine/core.py": "def f():\n    from ..cli import main\n",
        "cli/__init__.py": "from . import main\n",
        "cli/main.py": "from phi3v.engine import core\nfrom .. import errors\n",
        "cli/gone.py": "from ..engine.moved import x\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "PACKAGE_DIR", root)
    monkeypatch.setattr(this, "MODULES", module_files())
    graph, missing = import_graph()
    assert graph["phi3v"] == {"phi3v.errors"}
    assert graph["phi3v.cli"] == {"phi3v.cli.main"}  # the package re-exports its submodule
    assert graph["phi3v.cli.main"] == {"phi3v.engine.core", "phi3v.errors"}
    assert graph["phi3v.engine.core"] == {"phi3v.cli.main"}  # an import inside a function counts
    assert missing == ["phi3v.cli.gone:1 -> phi3v.engine.moved"]
    assert strongly_connected_components(graph) == [["phi3v.cli.main", "phi3v.engine.core"]]


# ---- the real package -----------------------------------------------------------------------


def test_engine_kernels_and_quant_never_import_entry_points():
    graph, _ = import_graph()
    bad = sorted(f"{module} -> {target}" for module, targets in graph.items() if in_layer(module, ENGINE_LAYERS)
                 for target in targets if in_layer(target, ENTRY_POINTS) or target == "phi3v.api")
    assert not bad, "the engine imports an entry point or the facade:\n" + "\n".join(bad)


def test_kernels_import_nothing_above_them():
    """Kernels are leaves: the engine and quant call them, never the other way round."""
    graph, _ = import_graph()
    above = ("phi3v.engine", "phi3v.quant", "phi3v.api") + ENTRY_POINTS
    bad = sorted(f"{module} -> {target}" for module, targets in graph.items() if in_layer(module, ("phi3v.kernels",))
                 for target in targets if in_layer(target, above))
    assert not bad, "kernels import a layer above them:\n" + "\n".join(bad)


def test_no_import_circle_among_phi3v_modules():
    graph, _ = import_graph()
    circles = strongly_connected_components(graph)
    assert not circles, "import circles (strongly connected components):\n" + "\n".join(
        " <-> ".join(component) for component in circles)


def test_every_phi3v_import_names_an_existing_module():
    _, missing = import_graph()
    assert not missing, "imports of phi3v modules that do not exist:\n" + "\n".join(missing)
