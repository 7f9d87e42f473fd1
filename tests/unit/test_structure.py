"""The tree keeps its shape: no import circles, no file over 400 lines, weight_sync and memory_saver
independent of the engine.

Imports are read from the source (``ast``): those at module level and inside classes, but not the
ones under ``if TYPE_CHECKING:`` (types only) nor inside functions (deliberate lazy loads, e.g.
backends picked at run time).
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("rollout", "weight_sync", "memory_saver", "kernels", "integrations")
MAX_LINES = 400


def _modules() -> dict[str, str]:
    found = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py") and not f.endswith(("_pb2.py", "_pb2_grpc.py")):
                    path = os.path.join(dirpath, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    tree = ast.parse(open(path).read())
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            else:
                visit(child)
                continue
            out.update(n for n in names if n in modules)

    visit(tree)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_weight_sync_and_memory_saver_do_not_import_the_engine() -> None:
    for name, deps in _graph().items():
        if name.startswith(("weight_sync", "memory_saver")):
            engine = sorted(d for d in deps if d.startswith("rollout") and d not in ("rollout", "rollout.errors"))
            assert not engine, f"{name} imports {engine}; only rollout.errors is shared"


def test_no_file_over_400_lines() -> None:
    long = {}
    for pkg in (*PACKAGES, "tests", "examples"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py") and not f.endswith(("_pb2.py", "_pb2_grpc.py")):
                    path = os.path.join(dirpath, f)
                    n = sum(1 for _ in open(path))
                    if n > MAX_LINES:
                        long[os.path.relpath(path, ROOT)] = n
    assert not long, f"files over {MAX_LINES} lines: {long}"
