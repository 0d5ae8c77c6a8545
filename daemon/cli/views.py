"""`kaizen status`, `lineage` and `show`: read-only views of the lineage DB (no torch is loaded)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.tree import Tree

from daemon.cli.common import ConfigOption, DataDirOption, app, console, fail, load_view, settings_from
from daemon.config import Settings


@app.command()
def status(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Champion, running iteration, pause state and iteration tallies."""
    from sqlalchemy.exc import DBAPIError

    from daemon.db.engine import open_lineage
    from daemon.views import status_view

    settings = settings_from(config, data_dir)
    try:
        view = load_view(settings, open_lineage, status_view)
    except DBAPIError as exc:
        raise fail(f"cannot read the lineage DB ({exc.orig}); if it predates this version, `kaizen init` migrates it") from None
    console.print(f"champion: {view['champion']}" + (f" (rollback would restore {view['rollback_target']})" if view["rollback_target"] else ""))
    if view["paused"]:
        console.print(f"[yellow]paused[/] by {view['paused_by']} at {view['paused_at']}" + (f": {view['pause_reason']}" if view["pause_reason"] else ""))
    running = view["running_iteration"]
    console.print("iterations: " + ", ".join(f"{n} {k}" for k, n in view["iterations_by_status"].items()) + (f" (running: {running})" if running else ""))
    if view["iterations_by_decision"]:
        console.print("decisions: " + ", ".join(f"{n} {k}" for k, n in sorted(view["iterations_by_decision"].items())))


@app.command("lineage")
def lineage_command(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Checkpoints and iterations: stage timings, pair counts, gate decisions, the champion."""
    settings = settings_from(config, data_dir)
    if as_json:
        from daemon.db.engine import open_lineage
        from daemon.views import lineage_view

        typer.echo(json.dumps(load_view(settings, open_lineage, lineage_view), indent=2))
        return
    print_lineage(settings)


def print_lineage(settings: Settings) -> None:
    from daemon.db.engine import open_lineage
    from daemon.views import lineage_view
    from daemon.stage_specs import OPTIONAL_STAGES, STAGE_ORDER, STAGE_SHORT_LABELS

    view = load_view(settings, open_lineage, lineage_view)
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

    settings = settings_from(config, data_dir)
    try:
        detail = load_view(settings, open_lineage, lambda s: iteration_detail(s, iteration, samples))
    except NotFound as exc:
        raise fail(str(exc)) from None
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
    _print_signals(d.get("signals", {}))
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


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def _print_signals(signals: dict[str, Any]) -> None:
    """The numbers that say whether this cycle could improve the model (daemon.views.iteration_signals)."""
    if not signals:
        return
    console.print(
        f"signals: judge {_fmt(signals.get('judge'))}, gate judge {_fmt(signals.get('gate_judge'))}; "
        f"truncation rate {_fmt(signals.get('truncation_rate'))}; looping rate {_fmt(signals.get('looping_rate'))}; self-generated share {_fmt(signals.get('self_generated_share'))}; "
        f"constraint satisfaction {_fmt(signals.get('satisfaction_rate'))}; trained pairs {_fmt(signals.get('trained_pairs'))} "
        f"(+{_fmt(signals.get('replayed_pairs'))} replayed); gate route {_fmt(signals.get('gate_route'))}",
        markup=False,
    )
    for s in signals.get("gate_suites", []):
        console.print(
            f"  gate suite {s['suite']}: candidate {s['candidate_score']:.3f} vs champion {s['champion_score']:.3f} "
            f"(n={s['n']}), difference {s['difference']:+.3f}, 95% CI [{s['lower']:+.3f}, {s['upper']:+.3f}], "
            f"detectable >= {_fmt(s.get('minimum_detectable'))}",
            markup=False,
        )


JUDGE_METRIC_LABELS = {
    "parse_failure_rate": "parse-failure rate",
    "self_agreement": "self-agreement",
    "position_bias_rate": "position bias (gate)",
    "position_bias": "debiased position bias (gate)",
    "mean_candidate_preference": "mean candidate preference (gate)",
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
