"""The package's shape, as docs/architecture.md draws it: imports go one way (no module
imports, at load time, a module that imports it back), and functions stay short enough to
read on one screen."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "softprompt"
MAX_FUNCTION_LINES = 80
# Longer functions, each with its reason (docs/architecture.md lists them too).
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imported(mods: dict[str, Path], module: str, node: ast.ImportFrom) -> set[str]:
    """The package modules an ``from ... import ...`` statement in ``module`` loads."""
    package = module if mods[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = {target} if target in mods else set()
    found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods)
    return found - {module}


def load_time_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports when it is loaded (module-level statements;
    the package's own ``__init__``, the facade that exports the API, is left out)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        if name == "softprompt":
            continue
        edges: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                edges |= _imported(mods, name, node)
        graph[name] = edges - {"softprompt"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles():
    graph = load_time_imports()
    assert len(graph) > 20  # the walk really found the modules
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_functions_fit_on_a_screen():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                key = f"{path.relative_to(PACKAGE.parent).as_posix()}:{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long[key] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
