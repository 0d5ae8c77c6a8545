"""No module imports another module's private (_underscore) names: what is shared is public."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = ("daemon", "workers", "policies", "migrations", "ops", "tests")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_our_module(dotted: str) -> bool:
    base = REPO.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _private_imports(path: Path) -> list[str]:
    """``from ours import _name``, and ``module._name`` on a module of ours imported here."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update({a.asname: a.name for a in node.names if a.asname and a.name.split(".")[0] in OURS})
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {alias.name}")
                elif _is_our_module(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules and _private(node.attr):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {modules[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_a_private_name_of_another() -> None:
    files = [p for top in OURS for p in sorted((REPO / top).rglob("*.py")) if ".venv" not in p.parts]
    assert len(files) > 50
    offences = [line for path in files for line in _private_imports(path)]
    assert offences == []
