"""The package's structure: its import graph, read from the source with ``ast``, has no
cycle, and no submodule imports the package top (``gradlocate/__init__.py``).

An edge ``a -> b`` is any import in ``a``'s source that names ``b``: at module level or
inside a function, ``import gradlocate.b``, ``from gradlocate.b import x``,
``from gradlocate import b`` (``b`` a submodule; ``from gradlocate import x`` for any
other ``x`` is an edge to the package top), and relative imports alike. A package's
edge is to its ``__init__.py`` (``gradlocate.trace``); importing ``gradlocate.trace.core``
is an edge to ``core`` only, not to the packages above it, which Python imports first
anyway. Imports under ``if TYPE_CHECKING:`` are annotations only (with ``from
__future__ import annotations``) and are not edges.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gradlocate"


# --------------------------------------------------------------------------- the graph


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (under ``root``) by dotted name; a package by its
    ``__init__.py``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except in the body of an
    ``if TYPE_CHECKING:`` (its ``else`` runs, so it counts)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from imports(ast.Module(body=[stmt], type_ignores=[]))
        else:
            yield from imports(child)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is a module of the package, else its longest prefix that is
    (``gradlocate.x.attr`` -> ``gradlocate.x``); ``None`` outside the package."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from (relative ones resolved
    against ``module``, which is a package when its file is an ``__init__.py``)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
            modules: dict[str, Path]) -> set[str]:
    """The package's modules that one import statement names."""
    if isinstance(node, ast.Import):
        found = {_known(a.name, modules) for a in node.names}
    else:
        base = _base(node, module, is_package)
        found = {_known(f"{base}.{a.name}", modules) if f"{base}.{a.name}" in modules else _known(base, modules)
                 for a in node.names}
    return {t for t in found if t is not None and t != module}


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, list[int]]]:
    """``graph[a][b]``: the lines of ``a``'s source that import ``b``."""
    modules = module_files(root, package)
    graph: dict[str, dict[str, list[int]]] = {m: {} for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in imports(tree):
            for t in targets(node, module, path.name == "__init__.py", modules):
                graph[module].setdefault(t, []).append(node.lineno)
    return graph


# --------------------------------------------------------------------------- cycles


def strongly_connected(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan):
    each is one knot of import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def a_cycle(graph: dict[str, dict[str, list[int]]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, as ``[a, b, ..., a]`` (a
    shortest one, by breadth-first search inside the component)."""
    start, inside = component[0], set(component)
    came: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came[path[-1]])
                    return path[::-1] + [start]
                if w in inside and w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def describe(graph: dict[str, dict[str, list[int]]], cycle: list[str]) -> str:
    """``a -> b (a.py:12) -> ...``: each edge with the lines that make it."""
    steps = [cycle[0]]
    for a, b in zip(cycle, cycle[1:]):
        lines = ",".join(map(str, graph[a][b]))
        steps.append(f"-> {b} (line {lines} of {a})")
    return " ".join(steps)


def cycles_report(graph: dict[str, dict[str, list[int]]]) -> list[str]:
    return [f"modules {', '.join(comp)}: e.g. {describe(graph, a_cycle(graph, comp))}"
            for comp in strongly_connected(graph)]


# --------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph):
    # A parser that silently found nothing would pass every test below.
    assert "gradlocate.trace.core" in graph["gradlocate.trace"]  # module level, a subpackage's module
    assert "gradlocate.trace" in graph["gradlocate.selectors"]  # inside cma_layer, a package import
    assert "gradlocate._compat" in graph["gradlocate.handles"]  # `from gradlocate import _compat`
    assert "gradlocate.trace.fast" in graph["gradlocate.trace.attribution"]


def test_no_import_cycles(graph):
    report = cycles_report(graph)
    assert not report, "import cycles in the gradlocate package:\n  " + "\n  ".join(report)


def test_no_submodule_imports_the_package_top(graph):
    # Submodules import from their sibling modules: `gradlocate/__init__.py` only re-exports.
    offenders = {m: edges[PACKAGE] for m, edges in graph.items() if PACKAGE in edges}
    assert not offenders, "these modules import the package top `gradlocate` (import from the module that " \
                          f"defines the name instead): {offenders} (module: lines)"


def test_trace_depends_one_way(graph):
    # core <- reference / fast / attribution <- gradlocate.trace (causal_trace): no module of
    # trace/ imports the dispatcher, core imports none of them, and no cycle touches trace/.
    trace = sorted(m for m in graph if m.startswith("gradlocate.trace."))
    assert {"gradlocate.trace.core", "gradlocate.trace.reference", "gradlocate.trace.fast",
            "gradlocate.trace.attribution"} <= set(trace)
    up = {m: graph[m]["gradlocate.trace"] for m in trace if "gradlocate.trace" in graph[m]}
    assert not up, f"modules of gradlocate/trace/ import the dispatcher gradlocate.trace: {up} (module: lines)"
    core = [t for t in graph["gradlocate.trace.core"] if t.startswith("gradlocate.trace")]
    assert not core, f"gradlocate.trace.core must import nothing from gradlocate/trace/, imports {core}"
    knots = [r for r, comp in zip(cycles_report(graph), strongly_connected(graph))
             if any(m == "gradlocate.trace" or m.startswith("gradlocate.trace.") for m in comp)]
    assert not knots, "import cycles through gradlocate/trace/:\n  " + "\n  ".join(knots)


# --------------------------------------------------------------------------- the parser itself


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, dict[str, list[int]]]:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(tmp_path, "pkg")


def test_parser_reads_every_form(tmp_path):
    g = _package(tmp_path, {
        "__init__.py": "from pkg.a import f\n",
        "a.py": "import pkg.b\nfrom pkg import c, name\n\ndef f():\n    from pkg.sub.d import g\n",
        "b.py": "from . import c\nfrom .sub import d\nimport os\n",
        "c.py": "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg.a import f\nelse:\n    from pkg import b\n",
        "sub/__init__.py": "from .d import g\nfrom .. import a\n",
        "sub/d.py": "from ..c import x\nfrom . import e\nfrom pkg.sub import g\n",
        "sub/e.py": "",
    })
    assert {m: sorted(e) for m, e in g.items()} == {
        "pkg": ["pkg.a"],
        "pkg.a": ["pkg", "pkg.b", "pkg.c", "pkg.sub.d"],  # `name` is no module: the package top
        "pkg.b": ["pkg.c", "pkg.sub.d"],
        "pkg.c": ["pkg.b"],  # the TYPE_CHECKING import is no edge, its else branch is
        "pkg.sub": ["pkg.a", "pkg.sub.d"],
        "pkg.sub.d": ["pkg.c", "pkg.sub", "pkg.sub.e"],
        "pkg.sub.e": [],
    }
    assert g["pkg.a"]["pkg.sub.d"] == [5]  # a function-level import


def test_cycles_are_found_and_named(tmp_path):
    g = _package(tmp_path, {"__init__.py": "", "a.py": "from pkg import b\n", "b.py": "def f():\n    import pkg.c\n",
                            "c.py": "from .a import x\n", "d.py": "import pkg.a\n"})
    assert strongly_connected(g) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert cycles_report(g) == ["modules pkg.a, pkg.b, pkg.c: e.g. pkg.a -> pkg.b (line 1 of pkg.a) "
                                "-> pkg.c (line 2 of pkg.b) -> pkg.a (line 1 of pkg.c)"]


#: The floors of the package, bottom up (README "How it is built"): data flows model ->
#: handles -> signals -> scores -> layer -> edit -> evaluation -> study, and a module
#: imports only from its own floor or below (plotting, at the bottom, imports nothing of ours).
FLOORS = [
    {"_compat", "dims", "data", "losses", "state", "plotting", "results", "discovery", "models", "threads"},
    {"handles"},
    {"interventions", "memory"},
    {"gradients", "evaluation", "trace"},
    {"editors", "selectors"},
    {"golden"},
    {"cli", "__main__", ""},
]


def floor_of(module: str) -> int:
    """The floor of a dotted module name, by its first part below the package."""
    head = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(FLOORS):
        if head in names:
            return i
    raise AssertionError(f"module {module} has no floor: add it to FLOORS (and to the README's table)")


def test_no_module_imports_a_higher_floor(graph):
    up = [f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)}) at line {lines[0]}"
          for a, out in graph.items() for b, lines in out.items()
          if b != PACKAGE and floor_of(b) > floor_of(a)]
    assert not up, "imports that go up:\n" + "\n".join(up)
