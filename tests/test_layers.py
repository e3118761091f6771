"""The package's layers, read from its source: what may import what.

- ``pseudonymise.core`` runs without Airflow (the CLI and the benchmark use it alone): no module of it
  imports ``airflow``, not even inside a function.
- One adapter per outside thing: ``hvac`` only in ``core/vault.py``, the C extension only through its
  typed facade ``core/native.py``.
- No import cycle among the package's modules at import time (imports inside functions and under
  ``TYPE_CHECKING`` are not executed on import, so they do not count).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plugins" / "pseudonymise"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, *, top_level_only: bool) -> Iterator[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))

    def walk(nodes: list[ast.stmt]) -> Iterator[str]:
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                yield target
                yield from (f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                if not top_level_only:
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and top_level_only:
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        yield from walk([c for c in children if isinstance(c, ast.stmt)]
                                        + [s for h in children if isinstance(h, ast.ExceptHandler) for s in h.body])

    yield from walk(tree.body)


def test_the_package_is_read() -> None:
    assert "pseudonymise.core.vault" in MODULES and "pseudonymise.operators" in MODULES and len(MODULES) > 30


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("pseudonymise.core")])
def test_core_never_imports_airflow(module: str) -> None:
    airflow = [name for name in _imports(module, top_level_only=False) if name.split(".")[0] == "airflow"]
    assert not airflow, f"{module} imports {airflow}: core must run without Airflow"


@pytest.mark.parametrize(("outside", "adapter"), [("hvac", "pseudonymise.core.vault"),
                                                  ("pseudonymise.core._native", "pseudonymise.core.native")])
def test_one_adapter_per_outside_thing(outside: str, adapter: str) -> None:
    importers = sorted(m for m in MODULES
                       if any(name == outside or name.startswith(outside + ".")
                              for name in _imports(m, top_level_only=False)))
    assert importers == [adapter]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for child in sorted(graph[module]):
            if state.get(child) == 1:
                return [*stack[stack.index(child):], child]
            if child not in state and (found := visit(child)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles() -> None:
    graph = {m: {n for n in _imports(m, top_level_only=True) if n in MODULES and n != m} for m in MODULES}
    assert sum(map(len, graph.values())) > 50  # the graph is real: the modules import each other
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_can_fail() -> None:
    """The cycle search finds a made-up cycle, and the import walk tells function-level imports apart."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    module = "pseudonymise.core.vault"
    assert "pseudonymise.core.errors" in set(_imports(module, top_level_only=True))
    assert "hvac" in set(_imports(module, top_level_only=False))  # imported inside a function: seen
    assert "hvac" not in set(_imports(module, top_level_only=True))
