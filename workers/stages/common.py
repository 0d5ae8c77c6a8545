"""What every stage shares: loading the checkpoint it works on, seeds, sampling, prompts, warnings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db import lineage
from daemon.db.models import Checkpoint, Event, Prompt, StageRun, StageStatus
from daemon.stage_specs import stage_index
from policies.end_ramp import EndRamp
from policies import judge_metrics
from workers.judges import Judge, JudgePrompt, build_judge
from workers.judges.base import Role
from workers.loading import load_runtime, load_sampler, user_prompt  # noqa: F401  (re-exported: the stages import both from here)
from daemon.stage_runs import StageContext
from workers.generation import Generation
from workers.runtime import ModelRuntime

log = structlog.get_logger(__name__)


def runtime_for(ctx: StageContext, checkpoint_path: str) -> ModelRuntime:
    return load_runtime(ctx.settings, checkpoint_path)


def sampler_for(ctx: StageContext, checkpoint_path: str) -> ModelRuntime:
    """The runtime that samples and scores on the configured engine (model.engine: hf or vllm);
    what respond and the model judges use. Stages that train take :func:`runtime_for`."""
    return load_sampler(ctx.settings, checkpoint_path)


def parent_checkpoint(ctx: StageContext, session: Session) -> Checkpoint:
    iteration = ctx.iteration(session)
    checkpoint = session.get(Checkpoint, iteration.parent_checkpoint_id)
    assert checkpoint is not None, "iterations reference an existing checkpoint by foreign key"
    return checkpoint


def steerlm_checkpoint(ctx: StageContext, session: Session) -> Checkpoint | None:
    """The attribute-conditioned SFT of the parent, if this iteration's steerlm_sft made one:
    DPO then starts from it, so the candidate keeps the SteerLM conditioning."""
    row = session.scalars(
        select(StageRun).where(StageRun.iteration_id == ctx.iteration_id, StageRun.stage == "steerlm_sft", StageRun.status == StageStatus.succeeded)
    ).one_or_none()
    checkpoint_id = row.result.get("checkpoint_id") if row is not None and not row.result.get("skipped") else None
    return session.get(Checkpoint, checkpoint_id) if checkpoint_id else None


def stage_seed(ctx: StageContext, stage: str) -> int:
    # Deterministic per (config seed, iteration, stage): a re-run samples the same data.
    return (ctx.settings.seed * 1_000_003 + ctx.iteration_id * 101 + stage_index(stage)) % (2**31)


def prompts_of_role(session: Session, iteration_id: int, role: str) -> list[Prompt]:
    return list(
        session.scalars(select(Prompt).where(Prompt.iteration_id == iteration_id, Prompt.role == role).order_by(Prompt.id))
    )


def sample(
    ctx: StageContext, runtime: ModelRuntime, texts: list[str], *, n: int | Sequence[int], seed: int, end_ramp: EndRamp | None = None,
    **overrides: Any,
) -> list[list[Generation]]:
    """``runtime.generate`` on the texts that fit the model's context with room for the new tokens:
    ``n`` samples per text, or ``n[i]`` for text i.

    A text that does not fit gets no samples (an empty list in its place): the loop skips it and
    counts it (:func:`over_context`) instead of crashing or feeding the model a clipped prompt.
    """
    g = ctx.settings.generation
    max_new_tokens = overrides.get("max_new_tokens", g.max_new_tokens)
    kept = [i for i, text in enumerate(texts) if runtime.fits(text, max_new_tokens)]
    counts = [n] * len(texts) if isinstance(n, int) else list(n)
    if len(kept) < len(texts):
        log.warning("prompts.over_context", skipped=len(texts) - len(kept), of=len(texts), context_length=runtime.profile.context_length)
    outputs = runtime.generate(
        [texts[i] for i in kept],
        num_samples=[counts[i] for i in kept],
        max_new_tokens=max_new_tokens,
        temperature=overrides.get("temperature", g.temperature),
        top_p=g.top_p,
        seed=seed,
        batch_size=g.batch_size,
        scheduler=g.scheduler,
        end_ramp=end_ramp,
    ) if kept else []
    results: list[list[Generation]] = [[] for _ in texts]
    for index, samples in zip(kept, outputs, strict=True):
        results[index] = samples
    return results


def over_context(outputs: list[list[Generation]]) -> int:
    """How many texts :func:`sample` skipped because they did not fit the context."""
    return sum(1 for samples in outputs if not samples)


def warning_thresholds(ctx: StageContext) -> judge_metrics.WarningThresholds:
    return judge_metrics.WarningThresholds(**ctx.settings.judge.warnings.model_dump())


def record_warnings(session: Session, ctx: StageContext, checkpoint_id: str, warnings: list[str]) -> None:
    for line in warnings:
        log.warning("judge.warning", iteration_id=ctx.iteration_id, warning=line)
        session.add(
            Event(
                kind=judge_metrics.WARNING_EVENT_KIND, checkpoint_id=checkpoint_id, iteration_id=ctx.iteration_id,
                actor="judge_metrics", reason=line,
            )
        )


def stage_judge(ctx: StageContext, session: Session, role: Role, policy: Checkpoint, *, seed: int) -> Judge:
    """The judge configured for ``role``, with ``policy`` as its "self" and the lineage's first model
    and ``policy``'s parent at hand (frozen and implicit judges use them). Models load on first use."""
    parent = session.get(Checkpoint, policy.parent_id) if policy.parent_id else None
    return build_judge(
        ctx.settings, role, policy_path=policy.path, load_model=lambda path: sampler_for(ctx, path),
        initial_path=lineage.lineage_root(session, policy).path, parent_path=parent.path if parent else None, seed=seed,
    )


def judge_prompt(prompt: Prompt) -> JudgePrompt:
    """A prompt row as judges see it: its text and the constraints it carries."""
    return JudgePrompt(prompt.text, tuple(prompt.constraints or ()))


def jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(float(v), 6) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}

