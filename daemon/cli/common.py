"""What every `kaizen` command shares: the Typer app, its options, settings loading and failures."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from daemon.config import ConfigError, Settings, load_settings
from daemon.logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kaizen: a model that improves itself, cycle after cycle.")
# Piped output (CI logs, `| less`) would otherwise be cut to 80 columns and squash the tables.
console = Console(width=None if sys.stdout.isatty() else 160)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (default: ./kaizen.yaml if present)")]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="where the lineage DB, models and artifacts live")]
ModelOption = Annotated[str | None, typer.Option("--model", help="'tiny' (built in) or any HF path / hub id")]
ActorOption = Annotated[str | None, typer.Option("--actor", help="who is acting, for the audit trail (default: your login name)")]
ReasonOption = Annotated[str | None, typer.Option("--reason", "-r", help="why; recorded with the event")]


def settings_from(config: Path | None, data_dir: Path | None = None, model: str | None = None, **extra: Any) -> Settings:
    overrides: dict[str, Any] = dict(extra)
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        settings = load_settings(config, **overrides)
        if model is not None:
            settings.model.path = model
    except ConfigError as exc:
        typer.echo(f"kaizen: {exc}", err=True)
        raise typer.Exit(2) from None
    except ValueError as exc:  # validate_assignment on an override
        typer.echo(f"kaizen: invalid option: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def fail(message: str) -> typer.Exit:
    typer.echo(f"kaizen: {message}", err=True)
    return typer.Exit(1)


def initialise_checked(settings: Settings) -> Any:
    """``daemon.bootstrap.initialise`` in a model-holding process: model.cpu_threads applied, and a
    model that fails its checks (workers.model_checks) is one line and exit 1, nothing registered."""
    from daemon.bootstrap import initialise
    from workers.model_files import ModelSourceError
    from workers.runtime import configure_cpu_threads

    configure_cpu_threads(settings.model.cpu_threads)
    try:
        return initialise(settings)
    except ModelSourceError as exc:
        raise fail(str(exc)) from None


def require_lineage_db(settings: Settings) -> None:
    """An embedded (SQLite) lineage DB that does not exist yet means `kaizen init` was not run."""
    url = settings.resolved_database_url
    if url.startswith("sqlite") and not Path(url.split("///", 1)[1]).exists():
        raise fail(f"no lineage DB in {settings.resolved_data_dir}: run `kaizen init` first")
    check_lineage_integrity(settings)


def check_lineage_integrity(settings: Settings) -> None:
    """A damaged embedded lineage DB stops the command with one line, before anything touches it."""
    from daemon.db.integrity import DamagedDatabase, check_lineage_db

    try:
        check_lineage_db(settings.resolved_database_url)
    except DamagedDatabase as exc:
        raise fail(str(exc)) from None


def load_view(settings: Settings, open_lineage: Any, view_fn: Any) -> dict[str, Any]:
    require_lineage_db(settings)
    with open_lineage(settings)() as session:
        return view_fn(session)


def ops_sessions(settings: Settings) -> Any:
    """The lineage DB at head (pause needs the 0002 table), or a clear failure if there is none."""
    from daemon.db.engine import open_lineage
    from daemon.db.engine import upgrade_to_head

    require_lineage_db(settings)
    upgrade_to_head(settings.resolved_database_url)
    return open_lineage(settings)
