"""`kaizen init`, `run`, `cycle` and `worker`: preparing the lineage and running the loop."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from daemon.cli.common import (
    ConfigOption, DataDirOption, ModelOption, app, check_lineage_integrity, console, fail, initialise_checked, settings_from,
)


@app.command()
def init(config: ConfigOption = None, data_dir: DataDirOption = None, model: ModelOption = None) -> None:
    """Create the data dir, migrate the lineage DB to head, check the model and register it as the first champion."""
    from daemon.db import lineage

    settings = settings_from(config, data_dir, model)
    sessions = initialise_checked(settings)
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
    """Run the daemon: cycles on the configured schedule, stages on the workers.

    A second daemon on the same lineage DB waits as standby and takes over when the leader dies.
    """
    from daemon.dispatch import LocalWorker, make_dispatcher
    from daemon.leader import LeaderElectionError, leadership
    from daemon.cli.views import print_lineage
    from daemon.scheduler import Daemon

    settings = settings_from(config, data_dir, model)
    check_lineage_integrity(settings)  # before the leader lock, the migration or any write
    # Leader first: a standby neither migrates the DB nor starts a worker until it takes over.
    try:
        with leadership(settings) as leader:
            sessions = initialise_checked(settings)
            worker = LocalWorker(settings) if settings.worker.mode == "local" else None
            if worker:
                worker.start()
            daemon = Daemon(settings, sessions, make_dispatcher(settings, sessions, worker), max_cycles=cycles, leader=leader)
            try:
                daemon.run()
            finally:
                if worker:
                    worker.stop()
    except LeaderElectionError as exc:
        raise fail(str(exc)) from None
    print_lineage(settings)
    if daemon.gave_up:
        raise fail(f"the daemon stopped: {daemon.gave_up}")


@app.command()
def cycle(config: ConfigOption = None, data_dir: DataDirOption = None, model: ModelOption = None) -> None:
    """Run (or resume) one iteration in the foreground, stages in this process."""
    from daemon.cycle import CycleError, run_cycle
    from daemon.dispatch import EagerDispatcher
    from daemon.stage_specs import stages_for

    settings = settings_from(config, data_dir, model)
    sessions = initialise_checked(settings)
    refuse_if_paused(sessions)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("cycle", total=len(stages_for(settings)))

        def on_progress(stage: str, state: str) -> None:
            if state == "running":
                progress.update(task, description=f"{stage}")
            else:
                progress.advance(task)

        try:
            report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions), progress=on_progress)
        except CycleError as exc:
            raise fail(str(exc)) from None
    resumed = f", resumed at {report.resumed_from}" if report.resumed_from else ""
    console.print(f"iteration {report.iteration_id}: {report.decision} in {report.wall_seconds:.1f}s{resumed}")


def refuse_if_paused(sessions: Any) -> None:
    from daemon.db.lineage import pause_state

    with sessions() as session:
        state = pause_state(session)
    if state.paused:
        why = f": {state.reason}" if state.reason else ""
        raise fail(f"the daemon is paused (by {state.changed_by} at {state.changed_at:%Y-%m-%d %H:%M} UTC{why}); `kaizen resume` first")


@app.command()
def worker(
    config: ConfigOption = None,
    queues: Annotated[str, typer.Option("--queues", "-Q", help="comma-separated queues: gpu,cpu")] = "gpu,cpu",
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    """Start a Celery worker for the stages (one model-holding process per GPU)."""
    from daemon.dispatch import worker_command

    settings = settings_from(config)
    if config is not None:
        os.environ["KAIZEN_CONFIG"] = str(config.resolve())
    command = worker_command(queues.split(","), concurrency, loglevel=settings.log_level)
    os.execv(sys.executable, command)
