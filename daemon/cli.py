"""The `kaizen` command."""

from __future__ import annotations

import getpass
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
    """Run the daemon: cycles on the configured schedule, stages on the workers.

    A second daemon on the same lineage DB waits as standby and takes over when the leader dies.
    """
    from daemon.bootstrap import initialise
    from daemon.dispatch import LocalWorker, make_dispatcher
    from daemon.leader import LeaderElectionError, leadership
    from daemon.scheduler import Daemon

    settings = _settings(config, data_dir, model)
    # Leader first: a standby neither migrates the DB nor starts a worker until it takes over.
    try:
        with leadership(settings) as leader:
            sessions = initialise(settings)
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
        raise _fail(str(exc)) from None
    _print_lineage(settings)
    if daemon.gave_up:
        raise _fail(f"the daemon stopped: {daemon.gave_up}")


@app.command()
def cycle(config: ConfigOption = None, data_dir: DataDirOption = None, model: ModelOption = None) -> None:
    """Run (or resume) one iteration in the foreground, stages in this process."""
    from daemon.bootstrap import initialise
    from daemon.cycle import CycleError, run_cycle
    from daemon.dispatch import EagerDispatcher
    from daemon.stage_specs import stages_for

    settings = _settings(config, data_dir, model)
    sessions = initialise(settings)
    _refuse_if_paused(sessions)
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
            raise _fail(str(exc)) from None
    resumed = f", resumed at {report.resumed_from}" if report.resumed_from else ""
    console.print(f"iteration {report.iteration_id}: {report.decision} in {report.wall_seconds:.1f}s{resumed}")


def _refuse_if_paused(sessions: Any) -> None:
    from daemon.db.lineage import pause_state

    with sessions() as session:
        state = pause_state(session)
    if state.paused:
        why = f": {state.reason}" if state.reason else ""
        raise _fail(f"the daemon is paused (by {state.changed_by} at {state.changed_at:%Y-%m-%d %H:%M} UTC{why}); `kaizen resume` first")


@app.command()
def status(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Champion, running iteration, pause state and iteration tallies."""
    from sqlalchemy.exc import DBAPIError

    from daemon.db.engine import open_lineage
    from daemon.views import status_view

    settings = _settings(config, data_dir)
    try:
        view = _load_view(settings, open_lineage, status_view)
    except DBAPIError as exc:
        raise _fail(f"cannot read the lineage DB ({exc.orig}); if it predates this version, `kaizen init` migrates it") from None
    console.print(f"champion: {view['champion']}" + (f" (rollback would restore {view['rollback_target']})" if view["rollback_target"] else ""))
    if view["paused"]:
        console.print(f"[yellow]paused[/] by {view['paused_by']} at {view['paused_at']}" + (f": {view['pause_reason']}" if view["pause_reason"] else ""))
    running = view["running_iteration"]
    console.print("iterations: " + ", ".join(f"{n} {k}" for k, n in view["iterations_by_status"].items()) + (f" (running: {running})" if running else ""))
    if view["iterations_by_decision"]:
        console.print("decisions: " + ", ".join(f"{n} {k}" for k, n in sorted(view["iterations_by_decision"].items())))


def _require_lineage_db(settings: Settings) -> None:
    """An embedded (SQLite) lineage DB that does not exist yet means `kaizen init` was not run."""
    url = settings.resolved_database_url
    if url.startswith("sqlite") and not Path(url.split("///", 1)[1]).exists():
        raise _fail(f"no lineage DB in {settings.resolved_data_dir}: run `kaizen init` first")


def _load_view(settings: Settings, open_lineage: Any, view_fn: Any) -> dict[str, Any]:
    _require_lineage_db(settings)
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
        from daemon.db.engine import open_lineage
        from daemon.views import lineage_view

        typer.echo(json.dumps(_load_view(settings, open_lineage, lineage_view), indent=2))
        return
    _print_lineage(settings)


def _print_lineage(settings: Settings) -> None:
    from daemon.db.engine import open_lineage
    from daemon.views import lineage_view
    from daemon.stage_specs import OPTIONAL_STAGES, STAGE_ORDER, STAGE_SHORT_LABELS

    view = _load_view(settings, open_lineage, lineage_view)
    tree = Tree("checkpoints")
    nodes = {}
    for ckpt in view["checkpoints"]:
        label = _checkpoint_label(ckpt, is_champion=ckpt["id"] == view["champion"])
        parent = nodes.get(ckpt["parent"], tree)
        nodes[ckpt["id"]] = parent.add(label)
    console.print(tree)
    table = Table(title="iterations")
    shown = [s for s in STAGE_ORDER if any(s in it["stages"] for it in view["iterations"]) or s not in OPTIONAL_STAGES]
    for column in ("iter", "status", "parent→candidate", *(f"{STAGE_SHORT_LABELS[s]} s" for s in shown), "pairs (sr/rlcd)", "W/L/T win \\[lower]", "decision"):
        table.add_column(column)
    for it in view["iterations"]:
        stages = it["stages"]
        timings = [f"{stages[s]['seconds']:.1f}s" if s in stages and stages[s]["seconds"] is not None else stages.get(s, {}).get("status", "-") for s in shown]
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


def _checkpoint_label(ckpt: dict[str, Any], *, is_champion: bool) -> str:
    """One tree node: id, status (the champion's is its star), and the gate that made it."""
    gated = f" it {ckpt['iteration']} {ckpt['decision'] or ''}".rstrip() if ckpt.get("iteration") is not None else ""
    if ckpt.get("win_rate") is not None:
        gated += f" win {ckpt['win_rate']:.2f} \\[{ckpt['win_rate_lower_bound']:.2f}]"
    for suite, r in sorted(ckpt.get("suites", {}).items()):
        gated += f" {suite} {r['score']:.3f} \\[{r['ci_low']:.2f}-{r['ci_high']:.2f}, n={r['n']}]"
    status = "[bold green]★ champion[/]" if is_champion else ckpt["status"]
    return f"{ckpt['id']} {status}" + (f" [dim]{gated.strip()}[/]" if gated else "")


def _gate_cell(gate: dict[str, Any] | None) -> str:
    if not gate or gate["win_rate"] is None:
        return "-"
    verdicts = gate["wins"] + gate["losses"] + gate["ties"]
    if verdicts == 0:
        return f"no verdicts ({gate['unparseable']} unparseable)"
    return f"{gate['wins']}/{gate['losses']}/{gate['ties']} {gate['win_rate']:.2f} \\[{gate['win_rate_lower_bound']:.2f}]"


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

    settings = _settings(config, data_dir)
    sessions = _ops_sessions(settings)
    names = suite or settings.eval.suites
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        raise _fail(f"unknown suite {unknown[0]!r}; allowed: {', '.join(SUITES)}")
    try:
        with sessions() as session:
            target = resolve_checkpoint(session, checkpoint)
            initial_id = lineage.lineage_root(session, target).id
            other = resolve_checkpoint(session, against).id if against not in (None, "none") else None
    except lineage.LineageError as exc:
        raise _fail(str(exc)) from None
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
        raise _fail(str(exc)) from None
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


@app.command()
def serve(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (serve.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (serve.port)")] = None,
    steering: Annotated[str | None, typer.Option(help="default steering: none, urial, steerlm or genarm")] = None,
) -> None:
    """Serve the current champion with an OpenAI-compatible API; follows promotions and rollbacks."""
    import uvicorn

    from daemon.serving import build_app

    overrides = {k: v for k, v in {"host": host, "port": port, "default_steering": steering}.items() if v is not None}
    settings = _settings(config, data_dir, serve=overrides)
    from daemon.http_security import unauthenticated_bind_problem

    problem = unauthenticated_bind_problem(settings.serve.host, settings.serve.api_key, settings.serve.allow_unauthenticated)
    if problem:
        raise _fail(problem)
    _require_lineage_db(settings)
    console.print(f"serving the champion of {settings.resolved_data_dir} on http://{settings.serve.host}:{settings.serve.port}/v1")
    uvicorn.run(build_app(settings), host=settings.serve.host, port=settings.serve.port, log_config=None, access_log=False)


# ---------------------------------------------------------------- operator actions (audited)

ActorOption = Annotated[str | None, typer.Option("--actor", help="who is acting, for the audit trail (default: your login name)")]
ReasonOption = Annotated[str | None, typer.Option("--reason", "-r", help="why; recorded with the event")]


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return os.environ.get("USER") or f"uid {os.getuid()}"


def _ops_sessions(settings: Settings) -> Any:
    """The lineage DB at head (pause needs the 0002 table), or a clear failure if there is none."""
    from daemon.db.engine import open_lineage
    from daemon.db.engine import upgrade_to_head

    _require_lineage_db(settings)
    upgrade_to_head(settings.resolved_database_url)
    return open_lineage(settings)


def _lineage_change(settings: Settings, change: Any) -> Any:
    """Run ``change(session)`` in one transaction; a refused change exits 1 with its reason."""
    from daemon.db.engine import transaction
    from daemon.db.lineage import LineageError

    sessions = _ops_sessions(settings)
    try:
        with transaction(sessions) as session:
            return change(session)
    except LineageError as exc:
        raise _fail(str(exc)) from None


@app.command()
def promote(
    checkpoint: Annotated[str, typer.Argument(help="checkpoint id, e.g. ckpt-0042 (`kaizen lineage` lists them)")],
    reason: ReasonOption = None,
    actor: ActorOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make CHECKPOINT the champion (one transaction, audited). Rejected checkpoints are refused."""
    from daemon.db import lineage

    settings = _settings(config, data_dir)
    who = _actor(actor)
    target, previous = _lineage_change(settings, lambda s: lineage.manual_promote(s, checkpoint, actor=who, reason=reason))
    console.print(f"promoted {target.id} to champion (previous champion {previous}, now retired); recorded as {who}" + (f": {reason}" if reason else ""))


@app.command()
def rollback(
    to: Annotated[str | None, typer.Option("--to", help="an earlier champion to restore (default: the previous one)")] = None,
    reason: ReasonOption = None,
    actor: ActorOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Restore the previous champion (or --to an earlier one); one transaction, audited."""
    from daemon.db import lineage

    settings = _settings(config, data_dir)
    who = _actor(actor)
    restored, replaced = _lineage_change(settings, lambda s: lineage.rollback(s, actor=who, reason=reason, to=to))
    console.print(f"rolled back: champion is {restored.id} again (was {replaced}, now retired); recorded as {who}" + (f": {reason}" if reason else ""))


def _set_paused(paused: bool, reason: str | None, actor: str | None, config: Path | None, data_dir: Path | None) -> None:
    from daemon.db import lineage
    from daemon.views import status_view

    settings = _settings(config, data_dir)
    who = _actor(actor)
    changed, status = _lineage_change(settings, lambda s: (lineage.set_paused(s, paused, actor=who, reason=reason), status_view(s)))
    if not changed:
        state = f"already paused (by {status['paused_by']} at {status['paused_at']})" if paused else "not paused"
        console.print(f"the daemon is {state}; nothing changed")
        return
    if paused:
        running = status["running_iteration"]
        tail = f"; iteration {running} is in progress and finishes its cycle" if running else ""
        console.print(f"paused by {who}: the daemon starts no new cycle and resumes no interrupted one until `kaizen resume`{tail}")
    else:
        console.print(f"resumed by {who}: the daemon starts cycles again on its schedule")


@app.command()
def pause(reason: ReasonOption = None, actor: ActorOption = None, config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Stop the daemon from starting (or resuming) cycles; audited. Undo with `kaizen resume`."""
    _set_paused(True, reason, actor, config, data_dir)


@app.command()
def resume(reason: ReasonOption = None, actor: ActorOption = None, config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Let a paused daemon start cycles again; audited."""
    _set_paused(False, reason, actor, config, data_dir)


@app.command()
def show(
    iteration: Annotated[int, typer.Argument(help="iteration number (`kaizen lineage` lists them)")],
    samples: Annotated[int, typer.Option("--samples", min=0, help="sample prompts to print with their responses")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """One iteration in depth: stage timings, pair counts, judge-score histogram, sample prompts and responses."""
    from daemon.db.engine import open_lineage
    from daemon.views import NotFound, iteration_detail

    settings = _settings(config, data_dir)
    try:
        detail = _load_view(settings, open_lineage, lambda s: iteration_detail(s, iteration, samples))
    except NotFound as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(detail, indent=2, default=str))
        return
    _print_iteration(detail)


def _print_iteration(d: dict[str, Any]) -> None:
    from daemon.stage_specs import STAGE_ORDER

    console.print(f"[bold]iteration {d['iteration']}[/]: {d['status']}, decision {d['decision'] or '-'}; {d['parent']} → {d['candidate'] or '-'}")
    console.print(f"started {d['started_at']}, finished {d['finished_at'] or '-'}" + (f"\n[red]{d['error']}[/]" if d["error"] else ""))
    stages = Table(title="stages")
    for column in ("stage", "status", "attempts", "seconds", "result"):
        stages.add_column(column)
    for name in STAGE_ORDER:
        if name in d["stages"]:
            s = d["stages"][name]
            result = ", ".join(f"{k}={v}" for k, v in d["stage_results"].get(name, {}).items() if not isinstance(v, (list, dict)))
            stages.add_row(name, s["status"], str(s["attempts"]), f"{s['seconds']:.2f}" if s["seconds"] is not None else "-", result)
    console.print(stages)
    pairs = ", ".join(f"{k} {v}" for k, v in d["pair_counts"].items()) or "none"
    prompts = ", ".join(f"{k} {v}" for k, v in d["prompt_counts"].items()) or "none"
    console.print(f"prompts: {prompts}\npairs: {pairs}")
    console.print(f"gate: {_gate_cell(d['gate'])}" + ("".join(f"\n  - {r}" for r in d["gate"]["reasons"]) if d["gate"] else " not gated"))
    _print_judge_metrics(d.get("judge_metrics", {}), d.get("judge_warnings", []))
    for checkpoint, suites in d.get("suite_scores", {}).items():
        cells = [f"{suite} {r['score']:.3f} [{r['ci_low']:.3f}-{r['ci_high']:.3f}, n={r['n']}]" for suite, r in sorted(suites.items())]
        console.print(f"suite scores of {checkpoint}: " + "; ".join(cells), markup=False)
    histogram = d["score_histogram"]
    widest = max(histogram.values(), default=0) or 1
    console.print("judge scores:")
    for bucket, count in histogram.items():
        console.print(f"  {bucket:>11} {'█' * round(30 * count / widest):<30} {count}")
    if d["training_log"]:
        last = d["training_log"][-1]
        console.print(f"DPO: {len(d['training_log'])} logged steps, last loss {last['loss']:.4f}, reward margin {last['reward_margin']:.4f}")
    for prompt in d["samples"]:
        console.print(f"\n[bold]prompt {prompt['id']}[/] ({prompt['source']}): {prompt['text']}")
        for r in prompt["responses"]:
            scores = ", ".join("×" if s is None else f"{s:g}" for s in r["scores"]) or "-"
            text = r["text"].replace("\n", " ")
            console.print(f"  [{r['kind']}] ({r['tokens']} tokens, scores {scores}) {text[:160]}{'…' if len(text) > 160 else ''}", markup=False)


JUDGE_METRIC_LABELS = {
    "parse_failure_rate": "parse-failure rate",
    "self_agreement": "self-agreement",
    "position_bias_rate": "position bias (gate)",
    "length_correlation": "score~length correlation",
    "mean_score_gap": "chosen-rejected score gap",
    "mean_length_gap": "chosen-rejected length gap (tokens)",
    "score_token_mass": "probability on score tokens",
}


def _print_judge_metrics(metrics: dict[str, Any], warnings: list[str]) -> None:
    """How far this iteration's judge can be trusted (policies.judge_metrics); '-' = not measurable."""
    cells = []
    for key, label in JUDGE_METRIC_LABELS.items():
        if key in metrics:
            value = metrics[key]
            basis = f" ({metrics['self_agreement_basis']})" if key == "self_agreement" and metrics.get("self_agreement_basis") else ""
            cells.append(f"{label} {'-' if value is None else f'{value:.3f}'}{basis}")
    console.print("judge metrics: " + ("; ".join(cells) or "none recorded"), markup=False)
    for line in warnings:
        console.print(f"  warning: {line}", markup=False, style="yellow")


@app.command()
def dashboard(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (dashboard.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (dashboard.port)")] = None,
) -> None:
    """The web dashboard: lineage graph, charts, events, promote/rollback (token), /metrics."""
    import uvicorn

    from daemon.dashboard import create_dashboard_app

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = _settings(config, data_dir, dashboard=overrides) if overrides else _settings(config, data_dir)
    sessions = _ops_sessions(settings)
    where = f"http://{settings.dashboard.host}:{settings.dashboard.port}/"
    token = "promote/rollback enabled (token set)" if settings.dashboard.token else "read-only: set dashboard.token or KAIZEN_DASHBOARD__TOKEN to enable promote/rollback"
    console.print(f"dashboard for {settings.resolved_data_dir} on {where} ({token}); metrics at {where}metrics")
    uvicorn.run(create_dashboard_app(settings, sessions), host=settings.dashboard.host, port=settings.dashboard.port, log_config=None, access_log=False)


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
