"""The benchmark scripts import what the library has: a rename in ``osrm_core`` that a bench
module still imports under the old name fails here, not in the middle of ``bench/run.py``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _library_imports(path: Path) -> list[tuple[str, str]]:
    """Every ``from osrm_core... import name`` in ``path`` (at any depth, lazy imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("osrm_core")
            for alias in node.names]


def _resolve(module: str, name: str) -> None:
    """Import ``name`` from ``module`` as the statement would; ImportError if it does not exist."""
    if not hasattr(importlib.import_module(module), name):
        importlib.import_module(f"{module}.{name}")  # a submodule, or ImportError naming it


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_imports_resolve(path):
    for module, name in _library_imports(path):
        _resolve(module, name)


def test_the_check_sees_a_stale_name(tmp_path):
    stale = tmp_path / "stale.py"
    stale.write_text("def f():\n    from osrm_core.data import parse_task_spec\n")
    ((module, name),) = _library_imports(stale)
    with pytest.raises(ImportError):
        _resolve(module, name)
