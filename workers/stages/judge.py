"""Stage 3: the configured judge (``judge.backend``, workers/judges/) scores every sampled answer;
the judge's trustworthiness is measured too. Each judgment row records which judge made it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Judgment, Prompt, Response
from policies import judge_metrics
from workers.judges import Score
from daemon.stage_runs import StageContext, StageOutput
from workers.judges.base import OVER_CONTEXT
from workers.stages.common import judge_prompt, parent_checkpoint, record_warnings, stage_judge, stage_seed, warning_thresholds


def judge(ctx: StageContext) -> StageOutput:
    with ctx.sessions() as session:
        champion = parent_checkpoint(ctx, session)
        rows = session.execute(
            select(Response.id, Response.text, Response.num_tokens, Prompt)
            .join(Prompt, Prompt.id == Response.prompt_id)
            .where(Response.iteration_id == ctx.iteration_id, Response.kind == "policy")
            .order_by(Response.id)
        ).all()
        items = [(judge_prompt(prompt), answer) for _, answer, _, prompt in rows]
        scorer = stage_judge(ctx, session, "train", champion, seed=stage_seed(ctx, "judge"))
    scores = scorer.score(items)
    judgments = [
        judgment
        for (response_id, *_), score in zip(rows, scores, strict=True)
        for judgment in _judgment_rows(ctx.iteration_id, response_id, score)
    ]
    metrics = scorer.score_metrics(scores)
    metrics["length_correlation"] = judge_metrics.score_length_correlation(
        (score.value, num_tokens) for (_, _, num_tokens, _), score in zip(rows, scores, strict=True)
    )
    warnings = judge_metrics.judge_warnings(metrics, warning_thresholds(ctx))

    def write(session: Session) -> dict[str, Any]:
        session.add_all(judgments)
        record_warnings(session, ctx, champion.id, warnings)
        return {}

    values = [j.score for j in judgments if j.score is not None]
    failures = len(judgments) - len(values)
    result = {
        "judge": scorer.label_name,
        "mode": ctx.settings.judge.mode,
        "judgments": len(judgments),
        "unparseable": failures,
        "parse_failure_rate": round(failures / len(judgments), 4) if judgments else 0.0,
        "mean_score": round(sum(values) / len(values), 4) if values else None,
        # Answers whose judge prompt did not fit the judge model's context: skipped, not clipped.
        "skipped_over_context": sum(1 for score in scores if score.parse_error == OVER_CONTEXT),
        judge_metrics.JUDGE_METRICS_KEY: judge_metrics.rounded(metrics),
        "warnings": warnings,
    }
    return StageOutput(result, write)


def _judgment_rows(iteration_id: int, response_id: int, score: Score) -> list[Judgment]:
    """One row per judge sample when the score averages several (text mode), else one."""
    return [
        Judgment(
            iteration_id=iteration_id, response_id=response_id, sample_index=index, raw_output=s.raw,
            score=s.value, parse_error=s.parse_error, judge=s.judge,
        )
        for index, s in enumerate(score.samples or (score,))
    ]
