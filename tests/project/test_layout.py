"""The package's imports go one way: no circle, and no import up a layer.

``LAYERS`` is the one declaration of the layering (docs/design.md explains it): top first, each a
list of module prefixes. A module belongs to the layer of its longest matching prefix and may
import only from its own layer or a lower one. Importing ``a.b.c`` also runs the packages
``a.b`` (their ``__init__``), so those count as imported too. The imports are read with ``ast``,
none is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT as PROJECT

ROOT = "deltamerge"
PACKAGE = PROJECT / ROOT

LAYERS: list[tuple[str, list[str]]] = [
    ("command line", ["deltamerge.__main__", "deltamerge.cli", "deltamerge.interrupts"]),
    ("public API", ["deltamerge"]),  # the package itself: lazy names only
    ("entry points", [
        "deltamerge.apply", "deltamerge.make", "deltamerge.extract", "deltamerge.delta_files",
        "deltamerge.conversion", "deltamerge.options", "deltamerge.preflight",
        "deltamerge.integrity.checks", "deltamerge.integrity.delta_checks", "deltamerge.hub",
    ]),
    ("decoders", ["deltamerge.decoders"]),  # whole files, beside the stream: its run lifecycle
    ("engine", ["deltamerge.engine"]),
    ("kinds", ["deltamerge.kinds"]),
    # below the kinds: xor-files writes its own files; outputs/ are the formats that open them
    ("sinks", ["deltamerge.sinks", "deltamerge.outputs"]),
    ("sources", ["deltamerge.sources"]),
    ("digests", ["deltamerge.integrity"]),  # integrity's digest and manifest; checks is above
    ("formats", ["deltamerge.formats"]),
    ("leaves", [
        "deltamerge.errors", "deltamerge.cores", "deltamerge.names", "deltamerge.dtypes",
        "deltamerge.sizes", "deltamerge.arguments",
        "deltamerge.compute_pool",  # threads for the kinds' and the sinks' compute, torch on one each
        "deltamerge.progress",
        "deltamerge.faults", "deltamerge.memory", "deltamerge.tensor_spec", "deltamerge.results",
        "deltamerge.version",
        # the kinds' registry names each kind's code as "module:attribute", imported when a run
        # needs it, so that --help (and names) read it without loading torch
        "deltamerge.registry", "deltamerge.kind_registry",
    ]),
]

# Imports inside functions are allowed only here: for start-up speed (``--help`` without torch),
# and in the process entry, which installs the signal handlers before it imports the CLI.
DEFERRED_OK = ("deltamerge.cli", "deltamerge.__main__")


def find_modules(package: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _within(name: str, prefix: str) -> bool:
    """Whether ``name`` is ``prefix`` or inside it; the root prefix stands for itself only."""
    return name == prefix or (prefix != ROOT and name.startswith(prefix + "."))


def _ours(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


def layer_of(name: str) -> int:
    """Index into LAYERS (0 is the top); the longest matching prefix decides."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(name, prefix) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None, f"{name} is in no layer: add it to LAYERS in {__file__}"
    return best[0]


def _targets(modules: dict[str, Path], name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _ours(a.name)]
    if node.level:
        base = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if not _ours(base):
        return []
    named = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    return named if len(named) == len(node.names) else [*named, base]


def _run_by(importer: str, target: str) -> list[str]:
    """The target and the packages above it whose ``__init__`` importing it runs: not the
    importer's own (already running) nor the root (it imports no submodule)."""
    parts = target.split(".")
    packages = [".".join(parts[:i]) for i in range(2, len(parts))]
    return [p for p in packages if not _within(importer, p)] + [target]


Edge = tuple[str, int, bool]  # imported module, line, whether inside a function


def import_graph(modules: dict[str, Path]) -> dict[str, list[Edge]]:
    graph: dict[str, list[Edge]] = {}
    for name, path in modules.items():
        found: list[Edge] = []

        def visit(node: ast.AST, in_function: bool, name: str = name, found: list = found) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(modules, name, child):
                        found += [(m, child.lineno, in_function) for m in _run_by(name, target)
                                  if m != name]
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(ast.parse(path.read_text(), str(path)), False)
        graph[name] = found
    return graph


def upward_imports(graph: dict[str, list[Edge]]) -> list[str]:
    return [
        f"{name}:{line} ({LAYERS[layer_of(name)][0]}) imports {target} "
        f"({LAYERS[layer_of(target)][0]})"
        for name, edges in graph.items()
        for target, line, _ in edges
        if target in graph and layer_of(target) < layer_of(name)
    ]


def find_circle(graph: dict[str, list[Edge]]) -> list[str] | None:
    edges = {name: sorted({t for t, _, _ in out if t in graph}) for name, out in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in edges[name]:
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(edges):
        if name not in state and (circle := visit(name)):
            return circle
    return None


def deferred_imports(graph: dict[str, list[Edge]]) -> list[str]:
    return [
        f"{name}:{line} imports {target} inside a function"
        for name, edges in graph.items()
        for target, line, in_function in edges
        if in_function and not any(_within(name, p) for p in DEFERRED_OK)
    ]


MODULES = find_modules(PACKAGE)
GRAPH = import_graph(MODULES)


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer_of(name)
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert any(_within(m, prefix) for m in MODULES), f"{prefix} in LAYERS names no module"


def test_every_import_names_a_module_of_the_package():
    """A stale path must fail here, not resolve to another copy of the package (an editable
    install of a different checkout would answer for a module this one lacks)."""
    missing = [f"{name}:{line} imports {target}" for name, edges in GRAPH.items()
               for target, line, _ in edges if target not in MODULES]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_no_import_goes_up_a_layer():
    upward = upward_imports(GRAPH)
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_circle():
    circle = find_circle(GRAPH)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_no_package_import_deferred_into_a_function():
    deferred = deferred_imports(GRAPH)
    assert not deferred, "\n".join(deferred)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A made-up package with one import of each forbidden sort: every check names it."""
    fake = tmp_path / ROOT
    for folder in ("sources", "kinds"):
        (fake / folder).mkdir(parents=True)
    files = {
        "__init__.py": "",
        "errors.py": "from .kinds import detect\n",  # a leaf reaching up
        "sources/__init__.py": "from . import checkpoint\n",
        "sources/checkpoint.py": "from ..kinds import Kind\n",  # a source reaching up...
        "kinds/__init__.py": "from ..sources.checkpoint import Checkpoint\n",  # ...and a circle
        "kinds/detect.py": "def f():\n    from . import Kind\n",  # deferred
        "kinds/stale.py": "from ..readers import Checkpoint\n",  # no such module
    }
    for rel, text in files.items():
        (fake / rel).write_text(text)
    graph = import_graph(find_modules(fake))
    assert ("deltamerge.sources", 1, False) in graph["deltamerge.kinds"]  # __init__ runs too
    assert any("deltamerge.errors:1" in u for u in upward_imports(graph))
    assert any("deltamerge.sources.checkpoint:1" in u for u in upward_imports(graph))
    circle = find_circle(graph)
    assert circle is not None and {"deltamerge.kinds", "deltamerge.sources.checkpoint"} <= set(circle)
    assert ("deltamerge.readers", 1, False) in graph["deltamerge.kinds.stale"]
    assert deferred_imports(graph) == ["deltamerge.kinds.detect:2 imports deltamerge.kinds inside a function"]


def test_public_names_survive_their_modules_being_imported():
    """``deltamerge.make_delta`` is the function even after its module was imported by name (as
    the CLI does); a fresh interpreter, since the test session may have imported either first."""
    import subprocess
    import sys

    code = (
        "import deltamerge.make, deltamerge.conversion, deltamerge, types\n"
        "for n in ('make_delta', 'convert'):\n"
        "    assert not isinstance(getattr(deltamerge, n), types.ModuleType), n\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_test_file_imports_another_or_the_conftest():
    """Shared test code lives in modules named for what it holds (docs/design.md, "Tests"): a
    test file importing another runs that file's tests' imports and fixtures twice, and moving
    either breaks the other."""
    tests = PROJECT / "tests"
    modules = [p for p in tests.rglob("*.py") if ".cache" not in p.parts]
    assert len(modules) > 40
    found = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(tests)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] == "conftest" or n.split(".")[0].startswith("test_")]
    assert found == []
