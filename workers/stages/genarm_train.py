"""Optional stage: train an autoregressive reward model on this iteration's pairs (``workers.genarm``,
tuned by the config's ``genarm`` section); the server offers the newest one as reward model "loop"."""

from __future__ import annotations

import dataclasses

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Pair, Prompt, Response
from workers import artifacts
from workers.genarm import arm_checkpoint_id, train_autoregressive_reward_model
from workers.runtime import configure_cpu_threads
from workers.trainer_state import remote_trainer_state
from daemon.stage_runs import StageContext, StageOutput
from workers.stages.common import parent_checkpoint, runtime_for, stage_seed, user_prompt
from workers.training import PreferenceExample


def genarm_train(ctx: StageContext) -> StageOutput:
    """Train an ARM on this iteration's preference pairs.

    Starts from ``genarm.base_model_path`` if set, else from the iteration's parent checkpoint (the
    champion the pairs were sampled from). Skipped (no ``path`` in the result) with fewer pairs
    than ``training.min_pairs``. The ARM is an artifact, not a lineage checkpoint: it is written
    like the DPO candidate (staged locally, published under a remote ``artifacts_url``) and
    recorded only in this stage's result: ``path`` (its URI), β, loss and pair accuracy before/after.
    Resumable: a taken-over attempt continues from the newest trainer state saved every
    ``genarm.save_steps`` (``resumed_from_step``); a worker shutdown saves and hands the stage over.
    """
    config = ctx.settings.genarm
    with ctx.sessions() as session:
        parent_path = parent_checkpoint(ctx, session).path
        examples = _iteration_pairs(session, ctx.iteration_id)
    min_pairs = ctx.settings.training.min_pairs
    if len(examples) < min_pairs:
        return StageOutput({"skipped": f"{len(examples)} pairs, fewer than training.min_pairs={min_pairs}", "pairs": len(examples)})
    base_path = config.base_model_path or parent_path
    examples = _as_sampled(ctx, parent_path, examples)
    arm_id = arm_checkpoint_id(ctx.iteration_id)
    configure_cpu_threads(ctx.settings.model.cpu_threads)
    trained = train_autoregressive_reward_model(
        artifacts.model_path_for_loading(ctx.settings, base_path),
        examples,
        artifacts.checkpoint_staging_dir(ctx.settings, arm_id),
        config,
        seed=stage_seed(ctx, "genarm_train"),
        # Saved every genarm.save_steps beside the ARM-to-be; under a remote artifacts_url also there.
        state_store=remote_trainer_state(ctx.settings, arm_id),
    )
    uri = artifacts.publish_checkpoint(ctx.settings, trained.path, arm_id)
    return StageOutput({**trained.summary(), "path": uri, "base_model_path": str(base_path), "pairs": len(examples)})


def _as_sampled(ctx: StageContext, policy_path: str, examples: list[PreferenceExample]) -> list[PreferenceExample]:
    """The examples with their prompts rendered as the policy was sampled (and is served): the ARM
    guides decoding on exactly those prompt tokens."""
    runtime = runtime_for(ctx, policy_path)
    budget = ctx.settings.generation.max_new_tokens
    return [dataclasses.replace(ex, prompt_text=user_prompt(runtime, str(ex.prompt), budget)) for ex in examples]


def _iteration_pairs(session: Session, iteration_id: int) -> list[PreferenceExample]:
    rows = session.execute(
        select(Prompt.text, Pair.chosen_response_id, Pair.rejected_response_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .where(Pair.iteration_id == iteration_id)
        .order_by(Pair.id)
    ).all()
    texts = dict(session.execute(select(Response.id, Response.text).where(Response.iteration_id == iteration_id)).all())
    return [PreferenceExample(prompt=prompt, chosen=texts[c], rejected=texts[r]) for prompt, c, r in rows]
