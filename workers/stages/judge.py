"""Stage 3: the judge scores every sampled answer; the judge's trustworthiness is measured too."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Judgment, Prompt, Response
from policies import judge_metrics, rubric
from workers.runtime import ModelRuntime
from workers.stage_runner import StageContext, StageOutput
from workers.stages.common import parent_checkpoint, record_warnings, runtime_for, sample, stage_seed, user_prompt, warning_thresholds


def judge(ctx: StageContext) -> StageOutput:
    cfg = ctx.settings.judge
    with ctx.sessions() as session:
        champion = parent_checkpoint(ctx, session)
        rows = session.execute(
            select(Response.id, Response.text, Response.num_tokens, Prompt.text)
            .join(Prompt, Prompt.id == Response.prompt_id)
            .where(Response.iteration_id == ctx.iteration_id, Response.kind == "policy")
            .order_by(Response.id)
        ).all()
    runtime = runtime_for(ctx, champion.path)
    requests = [user_prompt(runtime, rubric.render_judge_prompt(prompt, answer)) for _, answer, _, prompt in rows]
    if cfg.mode == rubric.JUDGE_MODE_LOGPROB:
        judgments, metrics = _judge_by_logprob(ctx, runtime, [r[0] for r in rows], requests)
    else:
        judgments, metrics = _judge_by_text(ctx, runtime, [(r[0], r[1]) for r in rows], requests)
    scores_by_response: dict[int, list[float | None]] = defaultdict(list)
    for j in judgments:
        scores_by_response[j.response_id].append(j.score)
    metrics["length_correlation"] = judge_metrics.score_length_correlation(
        (rubric.mean_score(scores_by_response[response_id]), num_tokens) for response_id, _, num_tokens, _ in rows
    )
    warnings = judge_metrics.judge_warnings(metrics, warning_thresholds(ctx))

    def write(session: Session) -> dict[str, Any]:
        session.add_all(judgments)
        record_warnings(session, ctx, champion.id, warnings)
        return {}

    scores = [j.score for j in judgments if j.score is not None]
    failures = len(judgments) - len(scores)
    result = {
        "mode": cfg.mode,
        "judgments": len(judgments),
        "unparseable": failures,
        "parse_failure_rate": round(failures / len(judgments), 4) if judgments else 0.0,
        "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
        judge_metrics.JUDGE_METRICS_KEY: judge_metrics.rounded(metrics),
        "warnings": warnings,
    }
    return StageOutput(result, write)


def _judge_by_text(
    ctx: StageContext, runtime: ModelRuntime, responses: list[tuple[int, str]], requests: list[str]
) -> tuple[list[Judgment], dict[str, Any]]:
    """K sampled judgments per response, the score parsed from each (policies.rubric)."""
    cfg = ctx.settings.judge
    outputs = sample(
        ctx, runtime, requests, n=cfg.num_samples, seed=stage_seed(ctx, "judge"),
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
    ) if requests else []
    judgments: list[Judgment] = []
    samples_per_response: list[list[float | None]] = []
    for (response_id, answer), samples in zip(responses, outputs, strict=True):
        parsed = [rubric.parse_judge_output(sample.text, answer) for sample in samples]
        samples_per_response.append([p.score for p in parsed])
        judgments += [
            Judgment(
                iteration_id=ctx.iteration_id, response_id=response_id, sample_index=index,
                raw_output=sample.text, score=p.score, parse_error=None if p.score is not None else p.reason[:256],
            )
            for index, (sample, p) in enumerate(zip(samples, parsed, strict=True))
        ]
    metrics = {
        "parse_failure_rate": judge_metrics.parse_failure_rate([j.score for j in judgments]),
        "self_agreement": judge_metrics.sample_agreement(samples_per_response),
        "self_agreement_basis": "samples",
    }
    return judgments, metrics


def _judge_by_logprob(
    ctx: StageContext, runtime: ModelRuntime, response_ids: list[int], requests: list[str]
) -> tuple[list[Judgment], dict[str, Any]]:
    """One exact judgment per response: the expected score under P(1..5) after the "Score:" cue.

    The distribution is computed, not sampled, so K samples would all be equal; self-agreement
    is the probability that two draws from it agree (policies.judge_metrics.distribution_agreement).
    """
    cues = [request + rubric.SCORE_CUE for request in requests]
    batch = ctx.settings.generation.batch_size
    distributions = runtime.continuation_distribution(cues, rubric.SCORE_CONTINUATIONS, batch_size=batch) if cues else []
    judgments = []
    for response_id, d in zip(response_ids, distributions, strict=True):
        score = rubric.expected_score(d.probabilities)
        summary = f"{score:.3f} (score tokens held {d.mass:.1%} of the next-token probability)"
        judgments.append(
            Judgment(
                iteration_id=ctx.iteration_id, response_id=response_id, sample_index=0,
                raw_output=rubric.describe_distribution(rubric.SCORE_CONTINUATIONS, d.probabilities, summary), score=score,
            )
        )
    metrics = {
        "parse_failure_rate": 0.0 if judgments else None,
        "self_agreement": judge_metrics.distribution_agreement(d.probabilities for d in distributions),
        "self_agreement_basis": "distribution",
        "score_token_mass": judge_metrics.mean_or_none(d.mass for d in distributions),
    }
    return judgments, metrics

