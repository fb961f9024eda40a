"""The shape of src/: no import circle, and the core names no engine, world or task family."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fastslow"
CORE = ("loop", "record", "channels", "policy", "drift", "launch", "config")
PARTICULAR = re.compile(r"^fastslow\.(engines|world|models|tasks\.(?!extract|sandbox)\w+)")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """fastslow modules ``path`` imports at run time, lazy imports included, ``if TYPE_CHECKING:`` left out."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(node.test) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fastslow"):
            found |= {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= {node.module} & modules
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & modules
    return found - {"fastslow"}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: runtime_imports(p, set(paths)) for m, p in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_src():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_no_particular_engine_world_or_task_family():
    graph = import_graph()
    for module in CORE:
        particular = sorted(m for m in graph[f"fastslow.{module}"] if PARTICULAR.match(m))
        assert particular == [], (module, particular)


def test_the_loop_and_launcher_name_no_engine():
    for module in ("loop", "record", "launch"):
        code = ast.unparse(ast.parse((SRC / f"{module}.py").read_text()))  # docstrings kept, comments gone
        assert not re.search(r"['\"](native|trl)['\"]", code), module
        assert "hasattr(" not in code, module
