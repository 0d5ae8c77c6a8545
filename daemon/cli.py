"""The `kaizen` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from daemon.config import ConfigError, Settings, load_settings
from daemon.logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kaizen: a model that improves itself, cycle after cycle.")
# Piped output (CI logs, `| less`) would otherwise be cut to 80 columns and squash the tables.
console = Console(width=None if sys.stdout.isatty() else 160)
STAGE_COLUMNS = {"generate_prompts": "gen", "respond": "respond", "judge": "judge", "build_pairs": "pairs", "dpo_update": "dpo", "evaluate_gate": "gate"}

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (default: ./kaizen.yaml if present)")]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="where the lineage DB, models and artifacts live")]
ModelOption = Annotated[str | None, typer.Option("--model", help="'tiny' (built in) or any HF path / hub id")]


def _settings(config: Path | None, data_dir: Path | None = None, model: str | None = None, **extra: Any) -> Settings:
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


def _fail(message: str) -> typer.Exit:
    typer.echo(f"kaizen: {message}", err=True)
    return typer.Exit(1)


@app.command()
def init(config: ConfigOption = None, data_dir: DataDirOption = None, model: ModelOption = None) -> None:
    """Create the data dir, migrate the lineage DB to head and register the first champion."""
    from daemon.bootstrap import initialise
    from daemon.db import lineage

    settings = _settings(config, data_dir, model)
    sessions = initialise(settings)
    with sessions() as session:
        champion = lineage.current_champion(session)
        assert champion is not None
        console.print(f"kaizen is ready in {settings.resolved_data_dir}; champion {champion.id} ({champion.base_model})")


@app.command()
def run(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    model: ModelOption = None,
    cycles: Annotated[int | None, typer.Option("--cycles", "-n", min=1, help="stop after N cycles")] = None,
) -> None:
    """Run the daemon: cycles on the configured schedule, stages on the workers."""
    from daemon.bootstrap import initialise
    from daemon.dispatch import LocalWorker, make_dispatcher
    from daemon.scheduler import Daemon

    settings = _settings(config, data_dir, model)
    sessions = initialise(settings)
    worker = LocalWorker(settings) if settings.worker.mode == "local" else None
    if worker:
        worker.start()
    daemon = Daemon(settings, sessions, make_dispatcher(settings, sessions, worker), max_cycles=cycles)
    try:
        daemon.run()
    finally:
        if worker:
            worker.stop()
    _print_lineage(settings)
    if daemon.gave_up:
        raise _fail(f"the daemon stopped: {daemon.gave_up}")


@app.command()
def cycle(config: ConfigOption = None, data_dir: DataDirOption = None, model: ModelOption = None) -> None:
    """Run (or resume) one iteration in the foreground, stages in this process."""
    from daemon.bootstrap import initialise
    from daemon.cycle import CycleError, run_cycle
    from daemon.dispatch import EagerDispatcher
    from workers.stages import STAGE_ORDER

    settings = _settings(config, data_dir, model)
    sessions = initialise(settings)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("cycle", total=len(STAGE_ORDER))

        def on_progress(stage: str, state: str) -> None:
            if state == "running":
                progress.update(task, description=f"{stage}")
            else:
                progress.advance(task)

        try:
            report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions), progress=on_progress)
        except CycleError as exc:
            raise _fail(str(exc)) from None
    resumed = f", resumed at {report.resumed_from}" if report.resumed_from else ""
    console.print(f"iteration {report.iteration_id}: {report.decision} in {report.wall_seconds:.1f}s{resumed}")


@app.command()
def status(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Champion, running iteration and the last decision."""
    from daemon.bootstrap import open_lineage
    from daemon.views import lineage_view

    settings = _settings(config, data_dir)
    view = _load_view(settings, open_lineage, lineage_view)
    running = [i for i in view["iterations"] if i["status"] == "running"]
    console.print(f"champion: {view['champion']}")
    console.print(f"iterations: {len(view['iterations'])}" + (f" (running: {running[0]['iteration']})" if running else ""))
    if view["iterations"]:
        last = view["iterations"][-1]
        console.print(f"last iteration {last['iteration']}: {last['status']}, decision {last['decision']}")


def _load_view(settings: Settings, open_lineage: Any, view_fn: Any) -> dict[str, Any]:
    if settings.resolved_database_url.startswith("sqlite") and not Path(settings.resolved_database_url.split("///", 1)[1]).exists():
        raise _fail(f"no lineage DB in {settings.resolved_data_dir}: run `kaizen init` first")
    with open_lineage(settings)() as session:
        return view_fn(session)


@app.command("lineage")
def lineage_command(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Checkpoints and iterations: stage timings, pair counts, gate decisions, the champion."""
    settings = _settings(config, data_dir)
    if as_json:
        from daemon.bootstrap import open_lineage
        from daemon.views import lineage_view

        typer.echo(json.dumps(_load_view(settings, open_lineage, lineage_view), indent=2))
        return
    _print_lineage(settings)


def _print_lineage(settings: Settings) -> None:
    from daemon.bootstrap import open_lineage
    from daemon.views import lineage_view
    from workers.stages import STAGE_ORDER

    view = _load_view(settings, open_lineage, lineage_view)
    tree = Tree("checkpoints")
    nodes = {}
    for ckpt in view["checkpoints"]:
        star = " [bold green]★ champion[/]" if ckpt["id"] == view["champion"] else ""
        label = f"{ckpt['id']} [dim]{ckpt['status']}[/]{star}"
        parent = nodes.get(ckpt["parent"], tree)
        nodes[ckpt["id"]] = parent.add(label)
    console.print(tree)
    table = Table(title="iterations")
    for column in ("iter", "status", "parent→candidate", *(f"{STAGE_COLUMNS[s]} s" for s in STAGE_ORDER), "pairs (sr/rlcd)", "W/L/T win \\[lower]", "decision"):
        table.add_column(column)
    for it in view["iterations"]:
        stages = it["stages"]
        timings = [f"{stages[s]['seconds']:.1f}s" if s in stages and stages[s]["seconds"] is not None else stages.get(s, {}).get("status", "-") for s in STAGE_ORDER]
        pairs = it["pairs"]
        gate = it["gate"]
        win = _gate_cell(gate)
        table.add_row(
            str(it["iteration"]), it["status"], f"{it['parent']}→{it['candidate'] or '-'}", *timings,
            f"{pairs['pairs']} ({pairs['self_reward_pairs']}/{pairs['rlcd_pairs']})" if pairs["pairs"] is not None else "-",
            win, it["decision"] or "-",
        )
    console.print(table)
    console.print(f"champion: [bold]{view['champion']}[/]")


def _gate_cell(gate: dict[str, Any] | None) -> str:
    if not gate or gate["win_rate"] is None:
        return "-"
    verdicts = gate["wins"] + gate["losses"] + gate["ties"]
    if verdicts == 0:
        return f"no verdicts ({gate['unparseable']} unparseable)"
    return f"{gate['wins']}/{gate['losses']}/{gate['ties']} {gate['win_rate']:.2f} \\[{gate['win_rate_lower_bound']:.2f}]"


@app.command()
def worker(
    config: ConfigOption = None,
    queues: Annotated[str, typer.Option("--queues", "-Q", help="comma-separated queues: gpu,cpu")] = "gpu,cpu",
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    """Start a Celery worker for the stages (one model-holding process per GPU)."""
    from daemon.dispatch import worker_command

    settings = _settings(config)
    if config is not None:
        os.environ["KAIZEN_CONFIG"] = str(config.resolve())
    command = worker_command(queues.split(","), concurrency, loglevel=settings.log_level)
    os.execv(sys.executable, command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
