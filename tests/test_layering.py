"""The layout's rule, read from the code: imports follow the data flow (common → data → train → serve; nothing
imports cluster), including imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Each package and the first-party packages it may import.
ALLOWED = {
    "common": {"common"},
    "data": {"common", "data"},
    "train": {"common", "data", "train"},
    "serve": {"common", "data", "train", "serve"},
    "cluster": {"common", "data", "train", "serve", "cluster"},
}


def first_party_imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return imported & (set(ALLOWED) | {"tests", "bench"})


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_comes_before_it(package: str) -> None:
    wrong = {
        str(path.relative_to(REPO)): sorted(imported - ALLOWED[package])
        for path in sorted((REPO / package).rglob("*.py"))
        if (imported := first_party_imports(path)) - ALLOWED[package]
    }
    assert wrong == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("def f():\n    from serve.runner import swap_model\n    import cluster.cli\n")
    assert first_party_imports(module) == {"serve", "cluster"}
