"""Stage 4: preference pairs: verified (the constraint checks separate two answers), repaired (a
failing answer against its verifier-guided repair), anchored (rejected from the initial model),
self-reward (judge scores) and RLCD, as pairs.strategy names."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Judgment, Pair, Prompt, Response, StageRun, StageStatus
from policies import judge_metrics, pairs, rubric
from daemon.stage_runs import StageContext, StageOutput
from policies.constraints import Constraint, check_all, echoes_instructions
from policies.repetition import loops
from workers.stages.common import parent_checkpoint, record_warnings, warning_thresholds


def build_pairs(ctx: StageContext) -> StageOutput:
    cfg = ctx.settings.pairs
    with ctx.sessions() as session:
        champion = parent_checkpoint(ctx, session)
        responses = list(session.scalars(select(Response).where(Response.iteration_id == ctx.iteration_id)))
        judgments = list(session.scalars(select(Judgment).where(Judgment.iteration_id == ctx.iteration_id)))
        gap_history = _earlier_score_gaps(session, ctx.iteration_id)
        constraints = {
            p.id: [Constraint.from_json(c) for c in (p.constraints or [])]
            for p in session.scalars(select(Prompt).where(Prompt.iteration_id == ctx.iteration_id))
        }
    by_id = {str(r.id): r for r in responses}
    # Answers at least this long count as unfinished (cut at the budget, or past pairs.finish_within of it).
    unfinished_at = math.ceil(cfg.finish_within * ctx.settings.generation.max_new_tokens)
    scores_by_response: dict[int, list[float | None]] = defaultdict(list)
    for j in judgments:
        scores_by_response[j.response_id].append(j.score)
    lengths = {str(r.id): r.num_tokens for r in responses}
    # Whether each policy or anchor answer loops, worked out once: pairs.reject_loops, ended pairs
    # (whatever that setting says) and the looping count all read it.
    looping = {str(r.id): loops(r.text) for r in responses if r.kind in ("policy", "anchor")}
    scored: dict[str, list[pairs.ScoredResponse]] = defaultdict(list)
    anchor: dict[str, list[pairs.ScoredResponse]] = defaultdict(list)
    rlcd: dict[int, dict[str, Response]] = defaultdict(dict)
    for r in responses:
        if r.kind in ("policy", "anchor"):
            mean = rubric.mean_score(scores_by_response.get(r.id, []))
            prompt_constraints = constraints.get(r.prompt_id, [])
            checks = tuple(check_all(prompt_constraints, r.text))
            echoes = cfg.reject_echoes and echoes_instructions(prompt_constraints, r.text)
            cut = r.num_tokens >= unfinished_at
            answer = pairs.ScoredResponse(
                str(r.id), r.text, mean, r.num_tokens, checks, cut, echoes, cfg.reject_unfinished and cut, cfg.reject_loops and looping[str(r.id)],
            )
            (scored if r.kind == "policy" else anchor)[str(r.prompt_id)].append(answer)
        elif r.kind.startswith("rlcd_"):
            rlcd[r.prompt_id][r.kind] = r
    if cfg.length_normalise:
        scored = pairs.length_normalised(scored)
    # While the champion is the initial model its own samples are the anchor (see respond).
    anchor_pool = anchor if anchor else scored
    self_reward = pairs.build_self_reward_pairs(scored, cfg.min_score_gap, cfg.length_epsilon)
    verified = pairs.build_verified_pairs(scored, cfg.length_epsilon or 0.0, cfg.chosen_must_finish, cfg.max_per_prompt)
    anchored = pairs.build_anchored_pairs(scored, anchor_pool, cfg.min_score_gap, cfg.length_epsilon or 0.0, cfg.chosen_must_finish)
    repaired, repaired_texts = pairs.build_repaired_pairs(
        scored, {str(pid): cs for pid, cs in constraints.items()}, cfg.max_per_prompt, cfg.chosen_must_finish
    )
    for pair in repaired:
        lengths[pair.chosen_id] = _estimated_tokens(by_id[pair.rejected_id], repaired_texts[pair.chosen_id])
    rlcd_pairs = pairs.build_rlcd_pairs(
        [
            pairs.RlcdSample(str(pid), str(k["rlcd_positive"].id), k["rlcd_positive"].text, str(k["rlcd_negative"].id), k["rlcd_negative"].text)
            for pid, k in rlcd.items()
            if {"rlcd_positive", "rlcd_negative"} <= k.keys()
        ]
    )
    selected = pairs.select_pairs(
        cfg.strategy, self_reward, rlcd_pairs, verified_pairs=verified, anchored_pairs=anchored, repaired_pairs=repaired,
        ended_pairs=pairs.build_ended_pairs({pid: [replace(r, loops=looping[r.response_id]) for r in answers] for pid, answers in scored.items()}),
    )
    dropped: list[pairs.PreferencePair] = []
    if cfg.max_length_ratio is not None:
        selected, dropped = pairs.cap_length_ratio(selected, lengths, cfg.max_length_ratio)
    metrics = judge_metrics.pair_gaps((p.score_gap, lengths[p.chosen_id], lengths[p.rejected_id]) for p in selected)
    warnings = judge_metrics.judge_warnings(metrics, warning_thresholds(ctx), gap_history)

    def write(session: Session) -> dict[str, Any]:
        response_ids = _store_repaired(session, [p for p in selected if p.kind == pairs.KIND_REPAIRED], repaired_texts, by_id, lengths)
        session.add_all(
            Pair(
                iteration_id=ctx.iteration_id, prompt_id=int(p.prompt_id), chosen_response_id=response_ids.get(p.chosen_id) or int(p.chosen_id),
                rejected_response_id=int(p.rejected_id), kind=p.kind, score_gap=p.score_gap,
            )
            for p in selected
        )
        record_warnings(session, ctx, champion.id, warnings)
        return {}

    result = {
        "pairs": len(selected),
        **{f"{kind}_pairs": sum(p.kind == kind for p in selected) for kind in pairs.BASE_STRATEGIES},
        "dropped_by_length_cap": len(dropped),
        "echoing_answers": sum(r.echoes for answers in scored.values() for r in answers),
        "looping_answers": sum(looping[str(r.id)] for r in responses if r.kind == "policy"),
        "unfinished_rejected": sum(by_id[p.rejected_id].num_tokens >= unfinished_at for p in selected if p.rejected_id in by_id),
        "length_normalised": cfg.length_normalise,
        judge_metrics.JUDGE_METRICS_KEY: judge_metrics.rounded(metrics),
        "warnings": warnings,
    }
    return StageOutput(result, write)


def _estimated_tokens(source: Response, text: str) -> int:
    """A repaired answer's length in tokens, scaled from its source's by characters (no tokenizer
    is loaded here; training tokenizes the text itself, so only the length metrics use this)."""
    return max(1, round(source.num_tokens * len(text) / max(1, len(source.text))))


def _store_repaired(
    session: Session, repaired: list[pairs.PreferencePair], texts: dict[str, str], sources: dict[str, Response], lengths: dict[str, int]
) -> dict[str, int]:
    """Store each repaired answer as a response of kind "repaired" beside its source; their ids by provisional id."""
    rows = {}
    for pair in repaired:
        source = sources[pair.rejected_id]
        rows[pair.chosen_id] = Response(
            iteration_id=source.iteration_id, prompt_id=source.prompt_id, kind=pairs.KIND_REPAIRED,
            sample_index=source.sample_index, text=texts[pair.chosen_id], num_tokens=lengths[pair.chosen_id],
        )
    session.add_all(rows.values())
    session.flush()
    return {provisional: row.id for provisional, row in rows.items()}


def _earlier_score_gaps(session: Session, iteration_id: int, limit: int = 100) -> list[float | None]:
    """The mean score gap of the iterations before this one, oldest first."""
    results = session.scalars(
        select(StageRun.result)
        .where(StageRun.stage == "build_pairs", StageRun.status == StageStatus.succeeded, StageRun.iteration_id < iteration_id)
        .order_by(StageRun.iteration_id.desc())
        .limit(limit)
    ).all()
    return [(r.get(judge_metrics.JUDGE_METRICS_KEY) or {}).get("mean_score_gap") for r in reversed(results)]

