"""Every module of daemon/ sits in a layer of the import-linter contract, so a new module is
placed on purpose (above or below workers) rather than escaping the contract unnoticed."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_daemon_module_is_in_a_layer() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {module.strip() for layer in layers for module in layer.replace("|", ":").split(":")}
    modules = {
        f"daemon.{p.stem if p.is_file() else p.name}"
        for p in (REPO / "daemon").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert len(modules) > 10
    assert sorted(modules - named) == []
