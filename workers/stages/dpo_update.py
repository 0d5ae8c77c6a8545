"""Stage 5: DPO + LoRA on the iteration's pairs (plus, with training.replay_iterations, the verified
and anchored pairs of earlier iterations); the merged candidate is published as a checkpoint and
the result lists the ids of every pair that trained it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from daemon.db import lineage
from daemon.db.models import Checkpoint, CheckpointStatus, Pair, Prompt, Response
from policies.pairs import CHECKED_KINDS
from workers import artifacts, tracking
from workers.model_profile import checkpoint_profile
from workers.runtime import configure_cpu_threads
from workers.trainer_state import remote_trainer_state
from daemon.stage_runs import StageContext, StageOutput
from workers.stages.common import jsonable, parent_checkpoint, runtime_for, stage_seed, steerlm_checkpoint, user_prompt


def dpo_update(ctx: StageContext) -> StageOutput:
    from workers.training import ADAPTER_SUBDIR, dpo_update as train

    t = ctx.settings.training
    with ctx.sessions() as session:
        champion = steerlm_checkpoint(ctx, session) or parent_checkpoint(ctx, session)
        # "initial" keeps the lineage's first model as the KL anchor across rounds, so drift is
        # measured from where the loop started rather than from the last champion.
        reference = lineage.lineage_root(session, champion) if t.reference == "initial" else champion
        rows = _pair_rows(session, Pair.iteration_id == ctx.iteration_id)
        # Checkable pairs keep their label across iterations (the checks do not drift like a
        # judge), so earlier cycles' verified/anchored pairs can be trained on again.
        first = ctx.iteration_id - t.replay_iterations
        replayed = _pair_rows(
            session, Pair.iteration_id >= first, Pair.iteration_id < ctx.iteration_id, Pair.kind.in_(CHECKED_KINDS)
        ) if t.replay_iterations else []
    examples, trained_ids = preference_examples(ctx, rows + replayed, t.max_length)
    over_length = len(rows) + len(replayed) - len(examples)
    if len(examples) < t.min_pairs:
        reason = f"{len(examples)} pairs, fewer than training.min_pairs={t.min_pairs}"
        return StageOutput({"skipped": reason, "pairs": len(examples), "skipped_over_length": over_length})
    checkpoint_id = lineage.candidate_checkpoint_id(ctx.iteration_id)
    out_dir = artifacts.checkpoint_staging_dir(ctx.settings, checkpoint_id)
    dataset_uri = artifacts.write_dataset(
        ctx.settings, ctx.iteration_id, "preference_pairs.jsonl",
        # "prompt" is the exact text the pair's answers were sampled from (and DPO trains on).
        ({"prompt": e.rendered_prompt(), "instruction": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples),
    )
    # The champion as reference needs no second model: dpo_update disables the adapter instead.
    reference_path = artifacts.model_path_for_loading(ctx.settings, reference.path) if reference.id != champion.id else None
    base_path = artifacts.model_path_for_loading(ctx.settings, champion.path)
    configure_cpu_threads(ctx.settings.model.cpu_threads)
    with tracking.training_reporting(ctx, "dpo_update") as reporting:
        trained = train(
            base_path, examples, out_dir, t, seed=stage_seed(ctx, "dpo_update"), reference_model_path=reference_path, reporting=reporting,
            # Under a remote artifacts_url the saved trainer state is kept there too, for a takeover elsewhere.
            state_store=remote_trainer_state(ctx.settings, checkpoint_id),
            # A candidate of a candidate also keeps its lineage adapter, for a vLLM server to hot-load.
            max_stacked_adapters=ctx.settings.model.vllm_max_stacked_adapters,
        )
    # Profiled before publishing: under a remote artifacts_url the staged files go away.
    profile = checkpoint_profile(trained.checkpoint_path, **ctx.settings.model.runtime_options()).as_dict()
    # Under a remote artifacts_url this uploads the checkpoint (manifest last); locally it is in place.
    checkpoint_uri = artifacts.publish_checkpoint(ctx.settings, trained.checkpoint_path, checkpoint_id)
    tracking.register_candidate(ctx, checkpoint_id, checkpoint_uri)

    def write(session: Session) -> dict[str, Any]:
        parent = steerlm_checkpoint(ctx, session) or parent_checkpoint(ctx, session)
        session.merge(
            Checkpoint(
                id=checkpoint_id, parent_id=parent.id, base_model=parent.base_model, path=checkpoint_uri,
                adapter_path=artifacts.join_uri(checkpoint_uri, ADAPTER_SUBDIR), status=CheckpointStatus.candidate,
                created_iteration_id=ctx.iteration_id, metrics=jsonable(trained.metrics), profile=profile,
            )
        )
        session.flush()
        ctx.iteration(session).candidate_checkpoint_id = checkpoint_id
        return {}

    result = {
        "checkpoint_id": checkpoint_id, "pairs": len(rows), "replayed_pairs": len(replayed), "reference": reference.id,
        "dataset": dataset_uri, "pair_ids": [r[0] for r in rows if r[0] in trained_ids],
        "replayed_pair_ids": [r[0] for r in replayed if r[0] in trained_ids], "skipped_over_length": over_length,
        "train_seconds": round(trained.train_seconds, 3), **jsonable(trained.metrics),
    }
    return StageOutput(result, write)


def _pair_rows(session: Session, *conditions) -> list[tuple[int, str, str, str, int]]:
    """(pair id, prompt text, chosen text, rejected text, rejected tokens) of the pairs matching `conditions`, by id."""
    chosen, rejected = aliased(Response), aliased(Response)
    return [
        tuple(row)
        for row in session.execute(
            select(Pair.id, Prompt.text, chosen.text, rejected.text, rejected.num_tokens)
            .join(Prompt, Prompt.id == Pair.prompt_id)
            .join(chosen, chosen.id == Pair.chosen_response_id)
            .join(rejected, rejected.id == Pair.rejected_response_id)
            .where(*conditions)
            .order_by(Pair.id)
        ).all()
    ]


def preference_examples(ctx: StageContext, rows: list[tuple[int, str, str, str, int]], max_length: int):  # type: ignore[no-untyped-def]
    """The pairs as training examples, each prompt rendered exactly as respond sampled it (the
    parent's runtime, the same budget), and the ids of the pairs kept: a pair whose prompt alone
    fills ``max_length`` or the model's context is left out (nothing of its answers would train).
    With ``training.cut_rejected_without_end``, a rejected answer as long as the budget (cut there)
    trains without an end marker."""
    from workers.training import PreferenceExample

    with ctx.sessions() as session:
        parent_path = parent_checkpoint(ctx, session).path
    runtime = runtime_for(ctx, parent_path)
    limit = min(max_length, runtime.profile.context_length)
    budget = ctx.settings.generation.max_new_tokens
    strip_cut_ends = ctx.settings.training.cut_rejected_without_end
    examples, kept = [], set()
    for pair_id, prompt, chosen, rejected, rejected_tokens in rows:
        text = user_prompt(runtime, prompt, budget)
        if runtime.prompt_tokens(text) < limit:
            examples.append(PreferenceExample(
                prompt=prompt, chosen=chosen, rejected=rejected, prompt_text=text, rejected_unfinished=strip_cut_ends and rejected_tokens >= budget,
            ))
            kept.add(pair_id)
    return examples, kept
