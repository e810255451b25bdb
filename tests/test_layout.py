"""The package's layout rules, checked from the source (no imports executed):

* no import cycles between the package's modules (module-level imports; imports inside functions are
  the deliberate way to defer heavy dependencies and are not edges);
* the modules that read results files, render reports and gate CI pull no torch or transformers in at
  import time, directly or through another lightkv module;
* no module over about 500 lines unless its docstring says it is one cohesive thing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightkv_cli"
MAX_LINES = 550  # "about 500"

#: Modules that must import without torch (``lightkv report``, ``lightkv check results.json``).
TORCH_FREE = (
    "lightkv_cli.results",
    "lightkv_cli.units",
    "lightkv_cli.files",
    "lightkv_cli.errors",
    "lightkv_cli.inputs",
    "lightkv_cli.profiles",
    "lightkv_cli.scoring.thresholds",
    "lightkv_cli.scoring.recommend",
    "lightkv_cli.scoring.stats",
    "lightkv_cli.report.console",
    "lightkv_cli.report.markdown",
    "lightkv_cli.report.html",
    "lightkv_cli.report.plots",
    "lightkv_cli.report.write",
    "lightkv_cli.methods.registry",
    "lightkv_cli.cli",
)
HEAVY = ("torch", "transformers")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module):
    """Import nodes executed at import time: top level and inside top-level try/if (not TYPE_CHECKING)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]


def _edges(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(lightkv modules, external top-level packages) imported at import time by module ``name``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()
    for node in _module_level_imports(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "__future__":
                continue
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            if t.split(".")[0] == "lightkv_cli":
                while t not in MODULES:
                    t = t.rpartition(".")[0]
                if t != name:
                    internal.add(t)
                    # Importing a.b.c runs a/__init__ and a/b/__init__ first.
                    parent = t.rpartition(".")[0]
                    while parent and parent != name and not name.startswith(parent + "."):
                        internal.add(parent)
                        parent = parent.rpartition(".")[0]
            else:
                external.add(t.split(".")[0])
    return internal, external


GRAPH = {name: _edges(name, path) for name, path in MODULES.items()}


def _closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += GRAPH[m][0]
    return seen


def test_no_import_cycles():
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v][0]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_real_edges():
    """Guards the checker itself: known edges and known heavy imports are found."""
    assert "lightkv_cli.report.facts" in GRAPH["lightkv_cli.report.markdown"][0]
    assert "torch" in GRAPH["lightkv_cli.runtime"][1]
    assert "lightkv_cli.cli.common" in _closure("lightkv_cli.cli")


@pytest.mark.parametrize("module", TORCH_FREE)
def test_reading_results_imports_no_torch(module):
    heavy = {m: sorted(set(HEAVY) & GRAPH[m][1]) for m in _closure(module)}
    offenders = {m: h for m, h in heavy.items() if h}
    assert not offenders, f"{module} imports {offenders} at import time (import them inside the function)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_small_or_say_why(module):
    path = MODULES[module]
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "cohesive" in doc.lower(), f"{path.relative_to(PACKAGE.parent)} has {lines} lines; split it or say why"
