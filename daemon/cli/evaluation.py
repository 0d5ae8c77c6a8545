"""`kaizen eval`: score a checkpoint on evaluation suites, record the result, compare with another."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from daemon.cli.common import ConfigOption, DataDirOption, app, console, fail, ops_sessions, settings_from
from daemon.config import Settings

AgainstOption = Annotated[
    str | None,
    typer.Option("--against", help="compare item by item with this checkpoint (id, champion, initial; 'none' to skip). "
                 "Default: initial when CHECKPOINT is champion and differs from it"),
]


@app.command("eval")
def eval_command(
    checkpoint: Annotated[str, typer.Argument(help="checkpoint id, 'champion' or 'initial'")] = "champion",
    suite: Annotated[list[str] | None, typer.Option("--suite", "-s", help="suite to run (repeatable; default: eval.suites)")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="the jsonl suite's items (default: eval.jsonl_path)")] = None,
    against: AgainstOption = None,
    force: Annotated[bool, typer.Option("--force", help="evaluate again even if a result for this config is recorded")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Score a checkpoint on evaluation suites (greedy answers), record the result, compare."""
    from daemon.db import lineage
    from daemon.db.suite_results import resolve_checkpoint
    from daemon.eval_report import paired_line, per_kind_line, result_line
    from policies.suites import SUITE_PAIRWISE_VS_INITIAL, SUITES

    settings = settings_from(config, data_dir)
    sessions = ops_sessions(settings)
    names = suite or settings.eval.suites
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        raise fail(f"unknown suite {unknown[0]!r}; allowed: {', '.join(SUITES)}")
    try:
        with sessions() as session:
            target = resolve_checkpoint(session, checkpoint)
            initial_id = lineage.lineage_root(session, target).id
            other = resolve_checkpoint(session, against).id if against not in (None, "none") else None
    except lineage.LineageError as exc:
        raise fail(str(exc)) from None
    reports = []
    for name in names:
        baseline = other if against is not None else (initial_id if checkpoint == "champion" and target.id != initial_id else None)
        if name == SUITE_PAIRWISE_VS_INITIAL and against is None:
            baseline = None  # it is already a comparison with the initial model
        report = _evaluate_report(settings, sessions, target.id, name, baseline, file=file, force=force, quiet=as_json)
        reports.append(report)
        if not as_json:
            console.print(result_line(report, report["cached"]), markup=False)
            for line in filter(None, [per_kind_line(report), report.get("against") and paired_line(report["against"]["checkpoint"], report["against"])]):
                console.print(line, markup=False)
    if as_json:
        typer.echo(json.dumps({"checkpoint": target.id, "results": reports}, indent=2))


def _evaluate_report(settings: Settings, sessions: Any, checkpoint_id: str, suite: str, baseline: str | None, **options: Any) -> dict[str, Any]:
    """Evaluate (or reuse) one suite result, and the paired difference against `baseline`."""
    from daemon.db.suite_results import report_of
    from workers.evaluation import cached_result, compare_checkpoints, evaluate_checkpoint

    quiet, force, file = options["quiet"], options["force"], options["file"]

    def run(checkpoint: str) -> tuple[Any, bool]:
        cached = None if force else cached_result(settings, sessions, checkpoint, suite, file=file)
        if cached is not None:
            return cached, True
        with _eval_progress(f"{suite} {checkpoint}", quiet) as progress:
            return evaluate_checkpoint(settings, sessions, checkpoint, suite, force=force, file=file, progress=progress), False

    try:
        row, cached = run(checkpoint_id)
        report = {**report_of(row), "cached": cached}
        if baseline is not None and baseline != checkpoint_id:
            run(baseline)  # with its own progress bar; compare_checkpoints then reuses both rows
            _, _, paired = compare_checkpoints(settings, sessions, checkpoint_id, baseline, suite, file=file)
            report["against"] = {"checkpoint": baseline, **paired.to_json()}
    except ValueError as exc:
        raise fail(str(exc)) from None
    return report


def _eval_progress(description: str, quiet: bool) -> Any:
    """A progress bar on a terminal (items answered so far); nothing when piped or --json."""
    from contextlib import contextmanager, nullcontext

    if quiet or not sys.stderr.isatty():
        return nullcontext(None)

    @contextmanager
    def bar() -> Any:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(description, total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)

    return bar()
