"""Stage 7: a newly promoted champion (and the lineage's initial model) scored on eval.suites.

Runs after the gate. Nothing happens when the gate did not promote, or when eval.suites is
empty. Results go to the suite_results table as they are computed, keyed by (checkpoint,
suite, config hash): they are caches, so a redelivered stage (or a gate that evaluated the
same checkpoints already) reuses them instead of evaluating twice.
"""

from __future__ import annotations

from daemon.db import lineage
from workers import tracking
from workers.evaluation import evaluate_checkpoint
from daemon.stage_runs import StageContext, StageOutput
from workers.stages.common import parent_checkpoint


def evaluate_suites(ctx: StageContext) -> StageOutput:
    with ctx.sessions() as session:
        iteration = ctx.iteration(session)
        promoted = iteration.decision == "promoted" and iteration.candidate_checkpoint_id is not None
        root = lineage.lineage_root(session, parent_checkpoint(ctx, session)).id
        targets = [root, iteration.candidate_checkpoint_id] if promoted else []
    if not ctx.settings.eval.suites or not targets:
        # The last stage: the gate's decision is committed, so the iteration's run is complete.
        tracking.record_iteration(ctx, [])
        return StageOutput({"evaluated": [], "skipped": "no promotion" if not targets else "eval.suites is empty"})
    evaluated = []
    for checkpoint_id in dict.fromkeys(targets):
        for suite in ctx.settings.eval.suites:
            row = evaluate_checkpoint(ctx.settings, ctx.sessions, checkpoint_id, suite)
            evaluated.append({"checkpoint": checkpoint_id, "suite": suite, "score": row.score, "n": row.n,
                              "ci_low": row.ci_low, "ci_high": row.ci_high})
    tracking.record_iteration(ctx, evaluated)
    return StageOutput({"evaluated": evaluated})


