"""Read models of the lineage for the CLI, the dashboard and the metrics: plain, JSON-ready dicts.

Every function issues a bounded number of queries whatever the lineage's size (no query per
iteration), so the dashboard stays fast on a lineage of many thousand cycles; see
ops/bench/dashboard.py for the measured times and migrations/versions/0002_ops.py for the indexes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from daemon.config import redact_snapshot
from daemon.db import lineage, suite_results
from daemon.db.models import Checkpoint, Evaluation, Event, Iteration, IterationStatus, Judgment, Pair, Prompt, Response, StageRun
from policies.judge_metrics import WARNING_EVENT_KIND as JUDGE_WARNING_EVENT
from policies.judge_metrics import iteration_judge_metrics
from policies.score_bins import UNPARSEABLE, empty_histogram, fit_bins, score_bucket
from daemon.stage_specs import STAGE_ORDER

# Judge scores are 1..5 (policies.rubric); a fractional mean falls in the bucket of its integer part.
DPO_CHART_KEYS = {"loss": "loss", "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}


class NotFound(LookupError):
    """A requested iteration or checkpoint does not exist; the message says how to list them."""


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _chunks(ids: Sequence[int], size: int = 500) -> Iterable[Sequence[int]]:
    # IN lists stay well below SQLite's bound-parameter limit.
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


# ---------------------------------------------------------------- batched loaders


def _stage_runs_by_iteration(session: Session, ids: Sequence[int]) -> dict[int, dict[str, StageRun]]:
    runs: dict[int, dict[str, StageRun]] = defaultdict(dict)
    for chunk in _chunks(ids):
        for row in session.scalars(select(StageRun).where(StageRun.iteration_id.in_(chunk))):
            runs[row.iteration_id][row.stage] = row
    return runs


def _evaluations_by_iteration(session: Session, ids: Sequence[int]) -> dict[int, Evaluation]:
    found: dict[int, Evaluation] = {}
    for chunk in _chunks(ids):
        # The comparisons (every held-out prompt and verdict) load only when a page asks for them.
        query = select(Evaluation).options(defer(Evaluation.comparisons)).where(Evaluation.iteration_id.in_(chunk))
        found.update((e.iteration_id, e) for e in session.scalars(query))
    return found


def score_histograms(session: Session, iteration_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Per iteration: judgments per score bucket ("1".."5") plus the unparseable ones."""
    histograms = {i: empty_histogram() for i in iteration_ids}
    for chunk in _chunks(list(iteration_ids)):
        rows = session.execute(
            select(Judgment.iteration_id, Judgment.score, func.count())
            .where(Judgment.iteration_id.in_(chunk))
            .group_by(Judgment.iteration_id, Judgment.score)
        )
        for iteration_id, score, count in rows:
            histograms[iteration_id][score_bucket(score)] += count
    return histograms


def fitted_score_histogram(session: Session, iteration_id: int, target_bins: int = 10) -> dict[str, int]:
    """One iteration's judgments in bins that fit the range of its scores, plus the unparseable ones.

    Logprob judges give expected scores such as 2.2-2.8: whole-number buckets would put them all
    in one bar, so the bins here span the observed range (see policies.score_bins.fit_bins).
    """
    rows = session.execute(select(Judgment.score, func.count()).where(Judgment.iteration_id == iteration_id).group_by(Judgment.score))
    counts: dict[float | None, int] = dict(rows.all())
    histogram = fit_bins({s: n for s, n in counts.items() if s is not None}, target_bins)
    histogram[UNPARSEABLE] = counts.get(None, 0)
    return histogram


# ---------------------------------------------------------------- iteration summaries


def _gate(evaluation: Evaluation | None) -> dict[str, Any] | None:
    if evaluation is None:
        return None
    return {
        "promote": evaluation.promote,
        "win_rate": evaluation.win_rate,
        "win_rate_lower_bound": evaluation.win_rate_lower_bound,
        "wins": evaluation.wins,
        "losses": evaluation.losses,
        "ties": evaluation.ties,
        "unparseable": evaluation.unparseable,
        "length_ratio": evaluation.length_ratio,
        "parse_failure_rate": evaluation.parse_failure_rate,
        "reasons": evaluation.reasons.get("reasons", []),
    }


def _summary(iteration: Iteration, stages: dict[str, StageRun], evaluation: Evaluation | None) -> dict[str, Any]:
    def result(stage: str) -> dict[str, Any]:
        return stages[stage].result if stage in stages else {}

    dpo = result("dpo_update")
    return {
        "iteration": iteration.id,
        "status": iteration.status.value,
        "parent": iteration.parent_checkpoint_id,
        "candidate": iteration.candidate_checkpoint_id,
        "decision": iteration.decision,
        "started_at": _iso(iteration.started_at),
        "finished_at": _iso(iteration.finished_at),
        "error": iteration.error,
        "stages": {
            name: {"status": stages[name].status.value, "seconds": stages[name].compute_seconds, "attempts": stages[name].attempts}
            for name in STAGE_ORDER
            if name in stages
        },
        "pairs": {k: result("build_pairs").get(k) for k in ("pairs", "self_reward_pairs", "rlcd_pairs")},
        "gate": _gate(evaluation),
        "mean_response_tokens": result("respond").get("mean_tokens"),
        "judge": {k: result("judge").get(k) for k in ("judgments", "unparseable", "parse_failure_rate", "mean_score")},
        "training": {name: dpo.get(key) for name, key in DPO_CHART_KEYS.items()} | {"steps": dpo.get("steps"), "skipped": dpo.get("skipped")},
    }


def summarize_iterations(session: Session, iterations: Sequence[Iteration]) -> list[dict[str, Any]]:
    ids = [it.id for it in iterations]
    stages = _stage_runs_by_iteration(session, ids)
    evaluations = _evaluations_by_iteration(session, ids)
    return [_summary(it, stages.get(it.id, {}), evaluations.get(it.id)) for it in iterations]


def recent_iterations(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """The last ``limit`` iterations, oldest first, each with its judge-score histogram."""
    query = select(Iteration).options(defer(Iteration.config_snapshot)).order_by(Iteration.id.desc()).limit(limit)
    newest_first = list(session.scalars(query))
    iterations = newest_first[::-1]
    summaries = summarize_iterations(session, iterations)
    histograms = score_histograms(session, [it.id for it in iterations])
    for summary in summaries:
        summary["score_histogram"] = histograms[summary["iteration"]]
    return summaries


# ---------------------------------------------------------------- checkpoints and the lineage


def _checkpoint_entry(
    c: Checkpoint, iteration: Iteration | None, evaluation: Evaluation | None, suites: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "id": c.id,
        "parent": c.parent_id,
        "status": c.status.value,
        "base_model": c.base_model,
        "path": c.path,
        "created_at": _iso(c.created_at),
        "iteration": c.created_iteration_id,
        "decision": iteration.decision if iteration else None,
        "win_rate": evaluation.win_rate if evaluation else None,
        "win_rate_lower_bound": evaluation.win_rate_lower_bound if evaluation else None,
        # The newest result per evaluation suite: score, n and its 95% interval.
        "suites": suites or {},
    }


def _checkpoint_entries(session: Session, checkpoints: Sequence[Checkpoint]) -> list[dict[str, Any]]:
    ids = [c.created_iteration_id for c in checkpoints if c.created_iteration_id is not None]
    iterations: dict[int, Iteration] = {}
    for chunk in _chunks(ids):
        query = select(Iteration).options(defer(Iteration.config_snapshot)).where(Iteration.id.in_(chunk))
        iterations.update((it.id, it) for it in session.scalars(query))
    evaluations = _evaluations_by_iteration(session, ids)
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for chunk in _chunks([c.id for c in checkpoints]):  # type: ignore[arg-type]
        scores.update(suite_results.latest_scores(session, chunk))
    return [
        _checkpoint_entry(c, iterations.get(c.created_iteration_id), evaluations.get(c.created_iteration_id), scores.get(c.id))  # type: ignore[arg-type]
        for c in checkpoints
    ]


def lineage_view(session: Session) -> dict[str, Any]:
    """The whole lineage (`kaizen lineage`): every checkpoint and iteration."""
    champion = lineage.current_champion(session)
    checkpoints = list(session.scalars(select(Checkpoint).order_by(Checkpoint.created_at, Checkpoint.id)))
    iterations = list(session.scalars(select(Iteration).order_by(Iteration.id)))
    return {
        "champion": champion.id if champion else None,
        "checkpoints": _checkpoint_entries(session, checkpoints),
        "iterations": summarize_iterations(session, iterations),
        "suite_history": suite_history(session),
    }


def suite_history(session: Session) -> dict[str, list[dict[str, Any]]]:
    """Per suite, the scores along the champion history (initial first, current last)."""
    return suite_results.champion_score_history(session)


def lineage_graph(session: Session, limit: int = 60) -> dict[str, Any]:
    """The newest ``limit`` checkpoints, their parents and the champion: what the graph draws.

    A lineage of thousands of cycles cannot be drawn whole; ``truncated`` says how many older
    checkpoints were left out.
    """
    champion = lineage.current_champion(session)
    query = select(Checkpoint).options(defer(Checkpoint.metrics)).order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
    newest = list(session.scalars(query.limit(limit)))
    wanted = {c.parent_id for c in newest if c.parent_id} | ({champion.id} if champion else set())
    missing = sorted(wanted - {c.id for c in newest})
    extra = list(session.scalars(select(Checkpoint).where(Checkpoint.id.in_(missing)))) if missing else []
    chosen = sorted(newest + extra, key=lambda c: (c.created_at, c.id))
    total = session.scalar(select(func.count()).select_from(Checkpoint)) or 0
    return {
        "champion": champion.id if champion else None,
        "nodes": _checkpoint_entries(session, chosen),
        "truncated": total - len(chosen),
    }


# ---------------------------------------------------------------- events and status


def _event_entry(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": e.kind,
        "checkpoint": e.checkpoint_id,
        "previous": e.previous_checkpoint_id,
        "iteration": e.iteration_id,
        "actor": e.actor,
        "reason": e.reason,
        "at": _iso(e.created_at),
    }


def recent_events(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """The newest events first."""
    return [_event_entry(e) for e in session.scalars(select(Event).order_by(Event.id.desc()).limit(limit))]


def status_view(session: Session) -> dict[str, Any]:
    champion = lineage.current_champion(session)
    pause = lineage.pause_state(session)
    running = session.scalars(
        select(Iteration.id).where(Iteration.status == IterationStatus.running).order_by(Iteration.id).limit(1)
    ).first()
    counts = {status.value: 0 for status in IterationStatus}
    decisions: dict[str, int] = {}
    # One pass over the (status, decision) index answers both tallies.
    for status, decision, n in session.execute(select(Iteration.status, Iteration.decision, func.count()).group_by(Iteration.status, Iteration.decision)):
        counts[status.value] += n
        if decision is not None:
            decisions[decision] = decisions.get(decision, 0) + n
    return {
        "champion": champion.id if champion else None,
        "rollback_target": lineage.rollback_target(session),
        "paused": pause.paused,
        "paused_by": pause.changed_by if pause.paused else None,
        "paused_at": _iso(pause.changed_at) if pause.paused else None,
        "pause_reason": pause.reason if pause.paused else None,
        "running_iteration": running,
        "iterations_by_status": counts,
        "iterations_by_decision": decisions,
    }


# ---------------------------------------------------------------- one iteration in depth


def iteration_signals(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether the cycle could learn: who judged, how many answers were cut at max_new_tokens or loop,
    how many training prompts the model wrote itself, how often its samples met their
    constraints, which pairs trained the candidate, and the gate's suite comparisons."""
    prompts, respond, judge = results.get("generate_prompts", {}), results.get("respond", {}), results.get("judge", {})
    dpo, gate_result = results.get("dpo_update", {}), results.get("evaluate_gate", {})
    return {
        "judge": judge.get("judge"),
        "gate_judge": gate_result.get("judge"),
        "truncation_rate": respond.get("truncation_rate"),
        "looping_rate": respond.get("looping_rate"),
        "self_generated_share": prompts.get("self_generated_share"),
        "satisfaction_rate": respond.get("satisfaction_rate"),
        "trained_pairs": dpo.get("pairs"),
        "replayed_pairs": dpo.get("replayed_pairs"),
        "gate_route": gate_result.get("route"),
        "gate_suites": gate_result.get("suites") or [],
    }


def iteration_detail(session: Session, iteration_id: int, samples: int = 3) -> dict[str, Any]:
    """`kaizen show` and the dashboard's iteration page: everything one cycle did."""
    iteration = session.get(Iteration, iteration_id)
    if iteration is None:
        last = session.scalar(select(func.max(Iteration.id)))
        known = f"iterations are numbered 1..{last}" if last else "no iteration has run yet"
        raise NotFound(f"no iteration {iteration_id}: {known} (`kaizen lineage` lists them)")
    detail = summarize_iterations(session, [iteration])[0]
    stages = _stage_runs_by_iteration(session, [iteration_id]).get(iteration_id, {})
    detail["stage_results"] = {name: stages[name].result for name in STAGE_ORDER if name in stages}
    detail["stage_errors"] = {name: stages[name].error for name in STAGE_ORDER if name in stages and stages[name].error}
    detail["judge_metrics"] = iteration_judge_metrics(detail["stage_results"])
    detail["signals"] = iteration_signals(detail["stage_results"])
    detail["judge_warnings"] = list(
        session.scalars(
            select(Event.reason).where(Event.iteration_id == iteration_id, Event.kind == JUDGE_WARNING_EVENT).order_by(Event.id)
        )
    )
    detail["score_histogram"] = fitted_score_histogram(session, iteration_id)
    detail["pair_counts"] = dict(
        session.execute(select(Pair.kind, func.count()).where(Pair.iteration_id == iteration_id).group_by(Pair.kind)).all()
    )
    detail["prompt_counts"] = {
        f"{role}/{source}": n
        for role, source, n in session.execute(
            select(Prompt.role, Prompt.source, func.count()).where(Prompt.iteration_id == iteration_id).group_by(Prompt.role, Prompt.source)
        )
    }
    detail["samples"] = _sample_prompts(session, iteration_id, samples)
    evaluation = _evaluations_by_iteration(session, [iteration_id]).get(iteration_id)
    detail["comparisons"] = (evaluation.comparisons.get("items", []) if evaluation else [])[:samples]
    detail["training_log"] = _training_log(session, iteration.candidate_checkpoint_id)
    detail["config"] = redact_snapshot(iteration.config_snapshot)  # a lineage older than the masking too
    # The newest suite results of the champion it started from and of its candidate.
    checkpoints = [c for c in (iteration.parent_checkpoint_id, iteration.candidate_checkpoint_id) if c]
    detail["suite_scores"] = suite_results.latest_scores(session, checkpoints)
    return detail


def _sample_prompts(session: Session, iteration_id: int, limit: int) -> list[dict[str, Any]]:
    prompts = list(
        session.scalars(
            select(Prompt).where(Prompt.iteration_id == iteration_id, Prompt.role == "train").order_by(Prompt.id).limit(limit)
        )
    )
    if not prompts:
        return []
    responses = list(
        session.scalars(
            select(Response)
            .where(Response.iteration_id == iteration_id, Response.prompt_id.in_([p.id for p in prompts]))
            .order_by(Response.id)
        )
    )
    scores: dict[int, list[float | None]] = defaultdict(list)
    if responses:
        judged = session.execute(
            select(Judgment.response_id, Judgment.score).where(Judgment.response_id.in_([r.id for r in responses])).order_by(Judgment.id)
        )
        for response_id, score in judged:
            scores[response_id].append(score)
    by_prompt: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in responses:
        by_prompt[r.prompt_id].append(
            {"id": r.id, "kind": r.kind, "principle": r.principle, "text": r.text, "tokens": r.num_tokens, "scores": scores.get(r.id, [])}
        )
    return [{"id": p.id, "text": p.text, "source": p.source, "responses": by_prompt.get(p.id, [])} for p in prompts]


def _training_log(session: Session, checkpoint_id: str | None) -> list[dict[str, Any]]:
    """Per-step DPO loss and reward margin from the candidate's manifest (TRL's log history)."""
    from workers.checkpoints import CheckpointError, read_manifest

    checkpoint = session.get(Checkpoint, checkpoint_id) if checkpoint_id else None
    if checkpoint is None:
        return []
    try:
        history = read_manifest(checkpoint.path).metadata.get("log_history", [])
    except CheckpointError:
        return []  # the files were moved or pruned; the DB summary still has the means
    return [
        {"step": e.get("step"), **{name: e.get(key) for name, key in DPO_CHART_KEYS.items()}}
        for e in history
        if "loss" in e and "rewards/margins" in e
    ]
