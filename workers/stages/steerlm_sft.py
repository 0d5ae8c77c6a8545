"""Optional stage: label the iteration's answers with SteerLM attributes, SFT the parent on them
(``workers.steerlm``, tuned by the config's ``steerlm`` section) and publish the checkpoint through
the artifact store, like every checkpoint; ``dpo_update`` then starts from it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Checkpoint, CheckpointStatus, Prompt, Response
from policies.steerlm import ATTRIBUTES, attribute_string, steerlm_messages
from workers import artifacts, tracking
from workers.lora_training import ADAPTER_SUBDIR
from daemon.stage_runs import StageContext, StageOutput
from workers.model_profile import checkpoint_profile
from workers.runtime import ModelRuntime, configure_cpu_threads
from workers.stages.common import jsonable, parent_checkpoint, runtime_for, stage_judge, stage_seed
from workers.steerlm import SteerExample, sft_attribute_conditioned, steerlm_checkpoint_id
from workers.trainer_state import remote_trainer_state

log = structlog.get_logger(__name__)


def _rendered(runtime: ModelRuntime, prompt: str, values: Mapping[str, int], budget: int) -> str:
    """The attribute-conditioned prompt exactly as the server's SteerLM steering renders it."""
    return runtime.render_chat(steerlm_messages([{"role": "user", "content": prompt}], dict(values)), max_new_tokens=budget)


def steerlm_sft(ctx: StageContext, *, response_kinds: tuple[str, ...] | None = None, register_as_candidate: bool = False) -> StageOutput:
    """Label the iteration's responses with the label judge, then SteerLM-SFT the parent on them.

    Writes a ``candidate`` checkpoint row ``ckpt-NNNN-steerlm`` whose parent is the iteration's
    parent checkpoint (and, with ``register_as_candidate``, makes it the iteration's candidate).
    ``response_kinds`` limits the responses labelled (None: all, RLCD ones too). The stage result
    records, per response id, the attribute string it was trained with, and per attribute how many
    responses could not be labelled. Too few fully labelled responses (``steerlm.min_examples``)
    skip training with the reason in the result.
    """
    config = ctx.settings.steerlm
    seed = stage_seed(ctx, "steerlm_sft")
    with ctx.sessions() as session:
        parent = parent_checkpoint(ctx, session)
        parent_path = parent.path
        labeller = stage_judge(ctx, session, "label", parent, seed=seed)
    rows = _labelled_rows(ctx, response_kinds)
    labels = labeller.label([(prompt, text) for _, text, prompt in rows], ATTRIBUTES)
    runtime = runtime_for(ctx, parent_path)
    budget = ctx.settings.generation.max_new_tokens
    examples = [
        (response_id, SteerExample(prompt, text, dict(label.values), prompt_text=_rendered(runtime, prompt, label.values, budget)))
        for (response_id, text, prompt), label in zip(rows, labels, strict=True)
        if label.complete
    ]
    failures = Counter(name for label in labels for name in label.failures)
    summary: dict[str, Any] = {
        "judge": labeller.label_name,
        "responses": len(rows),
        "labelled": len(examples),
        "unlabelled": len(rows) - len(examples),
        "label_failures": {name: failures[name] for name in ATTRIBUTES if failures[name]},
        "labels": {str(rid): attribute_string(ex.attributes) for rid, ex in examples},
    }
    log.info("steerlm.labelled", iteration_id=ctx.iteration_id, **{k: v for k, v in summary.items() if k != "labels"})
    if len(examples) < config.min_examples:
        return StageOutput({**summary, "skipped": f"{len(examples)} fully labelled responses, fewer than min_examples={config.min_examples}"})

    checkpoint_id = steerlm_checkpoint_id(ctx.iteration_id)
    out_dir = artifacts.checkpoint_staging_dir(ctx.settings, checkpoint_id)
    configure_cpu_threads(ctx.settings.model.cpu_threads)
    base_path = artifacts.model_path_for_loading(ctx.settings, parent_path)
    with tracking.training_reporting(ctx, "steerlm_sft") as reporting:
        trained = sft_attribute_conditioned(
            base_path, [ex for _, ex in examples], out_dir, config, seed=seed, reporting=reporting,
            state_store=remote_trainer_state(ctx.settings, checkpoint_id),  # saves reach a remote store too
            max_stacked_adapters=ctx.settings.model.vllm_max_stacked_adapters,
        )
    # Profiled before publishing: under a remote artifacts_url the staged files go away.
    profile = checkpoint_profile(trained.checkpoint_path, **ctx.settings.model.runtime_options()).as_dict()
    # Under a remote artifacts_url this uploads the checkpoint (manifest last); locally it is in place.
    checkpoint_uri = artifacts.publish_checkpoint(ctx.settings, trained.checkpoint_path, checkpoint_id)

    def write(session: Session) -> dict[str, Any]:
        parent_row = parent_checkpoint(ctx, session)
        # A re-run must not reset the status the gate or an operator gave the checkpoint since.
        if session.get(Checkpoint, checkpoint_id) is None:
            session.add(
                Checkpoint(
                    id=checkpoint_id, parent_id=parent_row.id, base_model=parent_row.base_model,
                    path=checkpoint_uri, adapter_path=artifacts.join_uri(checkpoint_uri, ADAPTER_SUBDIR),
                    status=CheckpointStatus.candidate, created_iteration_id=ctx.iteration_id,
                    metrics=jsonable(trained.metrics), profile=profile,
                )
            )
            session.flush()
        if register_as_candidate:
            ctx.iteration(session).candidate_checkpoint_id = checkpoint_id
        return {}

    result = {
        **summary,
        "checkpoint_id": checkpoint_id,
        "examples": trained.num_examples,
        "train_seconds": round(trained.train_seconds, 3),
        **jsonable(trained.metrics),
    }
    return StageOutput(result, write)


def _labelled_rows(ctx: StageContext, kinds: tuple[str, ...] | None):  # type: ignore[no-untyped-def]
    query = (
        select(Response.id, Response.text, Prompt.text)
        .join(Prompt, Prompt.id == Response.prompt_id)
        .where(Response.iteration_id == ctx.iteration_id)
        .order_by(Response.id)
    )
    if kinds is not None:
        query = query.where(Response.kind.in_(kinds))
    with ctx.sessions() as session:
        return session.execute(query).all()
