"""The shape of the core: stages import only downward (import-linter, in `make lint`), no module imports
itself back through others, and modules stay short enough to read in one sitting.

These guard the layout the issue on the house set up; a failure names the module and the cycle or its
length, so the fix is where the failure says."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import difficulty_router

PACKAGE_DIR = Path(difficulty_router.__file__).parent
MAX_LINES = 400
# A longer module must say why at its top, in a docstring paragraph starting with this phrase.
LENGTH_REASON = "Why this module is long:"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_core_imports_itself_back():
    """Lazy (function-level) imports count: a cycle hidden inside a function is still a cycle."""
    graph = grimp.build_graph("difficulty_router")
    modules = {m for m in graph.modules if m.startswith("difficulty_router.")}
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d in modules} for m in modules}
    assert _cycles(edges) == []


def test_modules_are_short_or_say_why():
    long_and_silent = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines <= MAX_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if LENGTH_REASON not in docstring:
            long_and_silent[str(path.relative_to(PACKAGE_DIR))] = lines
    assert long_and_silent == {}, (
        f"modules over {MAX_LINES} lines without a {LENGTH_REASON!r} paragraph in their docstring"
    )


def test_every_stage_says_what_it_is_for():
    """Each subpackage's __init__ carries a docstring of at least a sentence: the tree shows the pipeline."""
    silent = [
        str(init.parent.relative_to(PACKAGE_DIR))
        for init in sorted(PACKAGE_DIR.glob("*/__init__.py"))
        if len(ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or "") < 60
    ]
    assert silent == []
