"""Stage 6: the candidate against the champion; promote or reject.

Two kinds of evidence (policies.gate): the judged pairwise comparison on held-out prompts
(`gate.pairwise`), and the configured suites (`gate.suites`), each scored on candidate and
champion with the same greedy decoding, compared item by item with a paired bootstrap."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from daemon.db import lineage
from daemon.db.models import Checkpoint, Evaluation
from policies import debias, gate, judge_metrics
from workers import artifacts
from workers.checkpoints import CheckpointError
from workers.evaluation import compare_checkpoints
from workers.judges import Judge, JudgePrompt
from workers.judges.base import order_verdicts, swap_numbers
from daemon.stage_runs import StageContext, StageOutput
from workers.stages.common import (
    judge_prompt, parent_checkpoint, prompts_of_role, record_warnings, runtime_for, sample, stage_judge, stage_seed, user_prompt,
    warning_thresholds,
)


def evaluate_gate(ctx: StageContext) -> StageOutput:
    g = ctx.settings.gate
    rule = gate.GateRule(
        min_win_rate_lower_bound=g.min_win_rate_lower_bound, z=g.z, min_comparisons=g.min_comparisons,
        max_length_ratio=g.max_length_ratio, max_parse_failure_rate=g.max_parse_failure_rate,
        improve_suites=tuple(g.improve_suites), suite_min_lower_bound=g.suite_min_lower_bound,
        regression_tolerance=g.regression_tolerance,
    )
    with ctx.sessions() as session:
        iteration = ctx.iteration(session)
        champion = parent_checkpoint(ctx, session)
        candidate = session.get(Checkpoint, iteration.candidate_checkpoint_id) if iteration.candidate_checkpoint_id else None
        heldout = [judge_prompt(p) for p in prompts_of_role(session, ctx.iteration_id, "heldout")]
        # The champion is the gate's "self": it is frozen relative to the candidate, which limits self-preference.
        judge = stage_judge(ctx, session, "gate", champion, seed=stage_seed(ctx, "evaluate_gate") + 1)
    if candidate is None:
        return _no_candidate_decision(ctx, champion.id)
    refusal = _unloadable_checkpoint(ctx, candidate.path)
    if refusal is not None:
        return _refused_candidate_decision(ctx, candidate.id, champion.id, refusal)
    suite_comparisons, suite_lengths = _suite_comparisons(ctx, champion, candidate)
    if g.pairwise:
        comparisons, stats = _compare(ctx, judge, champion.path, candidate.path, heldout)
    else:
        # No judged comparison: the length check reads the suites' greedy answers instead.
        comparisons, stats = [], gate.tally([], *suite_lengths)
    decision = gate.decide(stats, rule, suite_comparisons)
    metrics = _position_metrics(comparisons)
    warnings = judge_metrics.judge_warnings(metrics, warning_thresholds(ctx))

    def write(session: Session) -> dict[str, Any]:
        _record_evaluation(session, ctx.iteration_id, candidate.id, champion.id, decision, stats, comparisons)
        record_warnings(session, ctx, champion.id, warnings)
        reason = "; ".join(decision.reasons)
        # An operator's promote/rollback during this cycle wins over a candidate trained on the old champion.
        blocked = lineage.gate_promotion_blocker(session, champion.id) if decision.promote else None
        if decision.promote and not blocked:
            lineage.promote(session, candidate.id, actor="gate", reason=reason, iteration_id=ctx.iteration_id)
        else:
            reason = f"{reason}; not promoted: {blocked}" if blocked else reason
            lineage.reject(session, candidate.id, actor="gate", reason=reason, iteration_id=ctx.iteration_id)
        ctx.iteration(session).decision = "promoted" if decision.promote and not blocked else "rejected"
        return {}

    result = {
        "decision": "promoted" if decision.promote else "rejected", **decision.as_dict(), "judge": judge.label_name,
        judge_metrics.JUDGE_METRICS_KEY: judge_metrics.rounded(metrics), "warnings": warnings,
    }
    return StageOutput(result, write)


# A comparison's verdict on (candidate, champion) as the gate's outcome.
_OUTCOMES = {"a": gate.OUTCOME_CANDIDATE, "b": gate.OUTCOME_CHAMPION, "tie": gate.OUTCOME_TIE, None: None}


def _compare(ctx: StageContext, judge: Judge, champion_path: str, candidate_path: str, prompts: list[JudgePrompt]):
    seed = stage_seed(ctx, "evaluate_gate")
    champion_rt = runtime_for(ctx, champion_path)
    candidate_rt = runtime_for(ctx, candidate_path)
    budget = ctx.settings.generation.max_new_tokens
    rendered = [(user_prompt(champion_rt, p.text, budget), user_prompt(candidate_rt, p.text, budget)) for p in prompts]
    # A held-out prompt too long for the context is left out (and counted), not clipped.
    keep = [i for i, (a, b) in enumerate(rendered) if champion_rt.fits(a, budget) and candidate_rt.fits(b, budget)]
    prompts, rendered = [prompts[i] for i in keep], [rendered[i] for i in keep]
    champion_out = [o[0] for o in sample(ctx, champion_rt, [a for a, _ in rendered], n=1, seed=seed)]
    candidate_out = [o[0] for o in sample(ctx, candidate_rt, [b for _, b in rendered], n=1, seed=seed)]
    verdicts = judge.compare([(p, cand.text, champ.text) for p, cand, champ in zip(prompts, candidate_out, champion_out, strict=True)])
    comparisons = []
    for prompt, comparison in zip(prompts, verdicts, strict=True):
        first, second = order_verdicts(comparison)
        comparisons.append(
            {
                "prompt": prompt.text, "candidate_first": first, "champion_first": second, "outcome": _OUTCOMES[comparison.verdict],
                "preference": None if comparison.preference is None else round(comparison.preference, 4),
                "judge": comparison.judge, "raw": comparison.raw,
            }
        )
    stats = gate.tally([c["outcome"] for c in comparisons], [o.num_tokens for o in candidate_out], [o.num_tokens for o in champion_out])
    return comparisons, stats


def _suite_comparisons(ctx: StageContext, champion: Checkpoint, candidate: Checkpoint):
    """Per gate suite, candidate vs champion on the same items (workers.evaluation.compare_checkpoints:
    paired bootstrap of the item differences and the minimum detectable difference), and both
    sides' answer lengths in tokens on the first suite. The champion's rows are cached per
    (checkpoint, suite, config hash), so it is scored once."""
    comparisons: list[gate.SuiteComparison] = []
    lengths: tuple[list[float], list[float]] = ([], [])
    for suite in ctx.settings.gate.suites:
        cand_row, champ_row, paired = compare_checkpoints(ctx.settings, ctx.sessions, candidate.id, champion.id, suite)
        if paired.n == 0:
            continue
        comparisons.append(
            gate.SuiteComparison(suite, paired.n, paired.a_score, paired.b_score, paired.low, paired.high, paired.minimum_detectable)
        )
        if not lengths[0]:
            lengths = tuple([float(item.get("tokens", 0)) for item in row.items["items"]] for row in (cand_row, champ_row))
    return comparisons, lengths


def _position_metrics(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Position bias of the gate's pairwise judge: the verdict-letter rate, and the debiased
    metric from the per-order numbers (``policies.debias``), with the mean debiased preference."""
    slots = [slot for c in comparisons if (slot := swap_numbers(c["raw"]).get("position_preference")) is not None]
    preferences = [c["preference"] for c in comparisons if c["preference"] is not None]
    return {
        "position_bias_rate": judge_metrics.position_bias_rate((c["candidate_first"], c["champion_first"]) for c in comparisons),
        "position_bias": debias.position_bias(slots),
        "first_slot_preference": debias.mean_first_slot_preference(slots),
        "mean_candidate_preference": judge_metrics.mean_or_none(preferences),
    }


def _record_evaluation(session: Session, iteration_id: int, candidate_id: str | None, champion_id: str, decision, stats, comparisons) -> None:
    session.add(
        Evaluation(
            iteration_id=iteration_id, candidate_id=candidate_id, champion_id=champion_id, promote=decision.promote,
            wins=stats.wins, losses=stats.losses, ties=stats.ties, unparseable=stats.unparseable,
            win_rate=decision.win_rate, win_rate_lower_bound=decision.win_rate_lower_bound,
            length_ratio=decision.length_ratio, parse_failure_rate=decision.parse_failure_rate,
            reasons={"reasons": list(decision.reasons)}, comparisons={"items": comparisons},
        )
    )


def _no_candidate_decision(ctx: StageContext, champion_id: str) -> StageOutput:
    reason = "no candidate checkpoint: too few preference pairs to train"

    def write(session: Session) -> dict[str, Any]:
        session.add(
            Evaluation(iteration_id=ctx.iteration_id, candidate_id=None, champion_id=champion_id, promote=False, reasons={"reasons": [reason]}, comparisons={"items": []})
        )
        ctx.iteration(session).decision = "skipped"
        return {}

    return StageOutput({"decision": "skipped", "reasons": [reason]}, write)


def _unloadable_checkpoint(ctx: StageContext, path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded (missing, truncated, corrupted), or None."""
    try:
        artifacts.model_path_for_loading(ctx.settings, path)
    except CheckpointError as exc:
        return str(exc)
    return None


def _refused_candidate_decision(ctx: StageContext, candidate_id: str, champion_id: str, problem: str) -> StageOutput:
    """A candidate that fails verification is rejected, so it can never be promoted, even by hand."""
    reason = f"candidate checkpoint refused at load: {problem}"

    def write(session: Session) -> dict[str, Any]:
        session.add(
            Evaluation(iteration_id=ctx.iteration_id, candidate_id=candidate_id, champion_id=champion_id, promote=False, reasons={"reasons": [reason]}, comparisons={"items": []})
        )
        lineage.reject(session, candidate_id, actor="gate", reason=reason, iteration_id=ctx.iteration_id)
        ctx.iteration(session).decision = "rejected"
        return {}

    return StageOutput({"decision": "rejected", "reasons": [reason]}, write)

