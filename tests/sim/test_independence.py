"""The simulator stands alone: it imports nothing from the picker it measures or the harness."""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_sim

PACKAGE = Path(vllm_sim.__file__).parent


def imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_the_picker_or_the_harness() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 5
    offending = {
        path.name: sorted(found)
        for path in modules
        if (found := imported_packages(path) & {"picker", "loadtest", "tests"})
    }
    assert offending == {}
