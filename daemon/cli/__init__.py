"""The `kaizen` command: one Typer app, its commands grouped by what they touch.

Commands import the heavy parts (torch, the workers) inside their functions, so `kaizen status`,
`lineage` and `show` never load a model.
"""

from __future__ import annotations

# Each module registers its commands on the app; this order is the order of `kaizen --help`.
from daemon.cli import loop, views, evaluation, servers, ops  # noqa: F401, I001
from daemon.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app()
