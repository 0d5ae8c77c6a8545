"""No module imports another module's private (_underscore) names: what is shared is public."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = ("daemon", "workers", "policies", "migrations", "ops", "tests")


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {alias.name}")
    return found


def test_no_module_imports_a_private_name_of_another() -> None:
    files = [p for top in OURS for p in sorted((REPO / top).rglob("*.py")) if ".venv" not in p.parts]
    assert len(files) > 50
    offences = [line for path in files for line in _private_imports(path)]
    assert offences == []
