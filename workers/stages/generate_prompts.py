"""Stage 1: the champion writes new training tasks (self-instruct), topped up from unused seeds;
every training task gets verifiable constraints attached (policies.verifiable)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Prompt, Response
from policies import curriculum, self_instruct, verifiable
from policies.pairs import KIND_REPAIRED
from policies.repair import REPAIRABLE_KINDS
from policies.constraints import KINDS, Constraint, check
from policies.heldout import split_seed_prompts
from daemon.stage_runs import StageContext, StageOutput
from workers.runtime import ModelRuntime
from workers.stages.common import parent_checkpoint, runtime_for, sample, stage_seed, user_prompt

# Self-instruct requests sampled per round: each continuation yields a few tasks, and a 135M
# model wastes many continuations (answers instead of tasks), so more draws per round raise
# the self-generated share at little cost (the request prompt is shared).
SAMPLES_PER_ROUND = 4


def prompt_constraints(prompt: Prompt) -> list[Constraint]:
    return [Constraint.from_json(c) for c in (prompt.constraints or [])]


def generate_prompts(ctx: StageContext) -> StageOutput:
    cfg = ctx.settings.prompts
    with ctx.sessions() as session:
        champion = parent_checkpoint(ctx, session)
        earlier_rows = list(session.scalars(select(Prompt).where(Prompt.role == "train", Prompt.iteration_id != ctx.iteration_id)))
        # Few-shot examples and deduplication work on tasks, not on the constraint sentences.
        earlier = [verifiable.task_of(p.text, prompt_constraints(p)) for p in earlier_rows]
        weights = _kind_weights(ctx, session)
    seeds, heldout = split_seed_prompts(self_instruct.load_seed_prompts(), ctx.settings.gate.heldout_prompts)
    pool = seeds if cfg.top_up_from == "seed" else verifiable.drop_suite_overlaps(verifiable.load_training_tasks())
    runtime = runtime_for(ctx, champion.path)
    rng = random.Random(stage_seed(ctx, "generate_prompts"))
    accepted: list[str] = []
    counts = {"parsed": 0, "filtered_out": 0, "duplicates": 0, "suite_overlaps": 0, "over_context": 0}
    for round_index in range(cfg.max_rounds):
        if len(accepted) >= cfg.per_cycle:
            break
        examples = self_instruct.select_few_shot(pool, earlier + accepted, cfg.few_shot, rng)
        topics = self_instruct.rotating_topics(rng) if cfg.topic_rotation else ()
        request = _fitting_request(runtime, examples, cfg.per_cycle, ctx.settings.generation.max_new_tokens, topics)
        if request is None:
            counts["over_context"] += 1
            continue
        outputs = sample(ctx, runtime, [request], n=SAMPLES_PER_ROUND, seed=stage_seed(ctx, "generate_prompts") + round_index)[0]
        for output in outputs:
            parsed = self_instruct.parse_generated_prompts(output.text)
            if cfg.clean_generated_tasks:
                parsed = self_instruct.clean_generated_tasks(parsed)
            kept = self_instruct.filter_prompts(parsed, min_words=cfg.min_words, max_words=cfg.max_words)
            fresh = self_instruct.deduplicate(kept, pool + seeds + heldout + earlier + accepted, max_overlap=cfg.max_overlap)
            # A task the model happens to write that is (nearly) a held-out suite task never trains.
            clean = verifiable.drop_suite_overlaps(fresh)
            counts["parsed"] += len(parsed)
            counts["filtered_out"] += len(parsed) - len(kept)
            counts["duplicates"] += len(kept) - len(fresh)
            counts["suite_overlaps"] += len(fresh) - len(clean)
            accepted.extend(clean[: cfg.per_cycle - len(accepted)])
    generated = len(accepted)
    # A weak model may not yet write usable tasks; unused pool tasks keep the cycle fed, and
    # the source column says which prompts the model wrote itself.
    used = set(earlier)
    unused = [s for s in pool if s not in used]
    rng.shuffle(unused)
    topped_up = unused[: cfg.per_cycle - generated]
    constraint_rng = verifiable.training_rng(ctx.settings.seed, ctx.iteration_id)

    def constrained(task: str) -> verifiable.VerifiablePrompt:
        k = verifiable.constraint_count(constraint_rng, cfg.constraints_per_prompt)
        budget = ctx.settings.generation.max_new_tokens if cfg.fit_answer_budget else None
        return verifiable.attach_constraints(task, constraint_rng, k, cfg.constraint_kinds, weights, answer_budget=budget)

    train = [(constrained(t), "generated") for t in accepted] + [(constrained(t), cfg.top_up_from) for t in topped_up]

    def write(session: Session) -> dict[str, Any]:
        rows = [
            Prompt(
                iteration_id=ctx.iteration_id, text=vp.prompt, role="train", source=source,
                constraints=[c.to_json() for c in vp.constraints] or None,
            )
            for vp, source in train
        ]
        rows += [Prompt(iteration_id=ctx.iteration_id, text=t, role="heldout", source="seed") for t in heldout]
        session.add_all(rows)
        return {}

    total = len(train)
    result = {
        "generated": generated,
        "from_seed": len(topped_up),
        "self_generated_share": round(generated / total, 4) if total else 0.0,
        "constrained": sum(1 for vp, _ in train if vp.constraints),
        "kind_weights": {kind: round(w, 4) for kind, w in sorted((weights or {}).items())} or None,
        "heldout": len(heldout),
        **counts,
    }
    return StageOutput(result, write)


def _kind_weights(ctx: StageContext, session: Session) -> dict[str, float] | None:
    """Learnability weights from the policy samples of the last few earlier iterations' training
    prompts (None: uniform). Only training samples count, never a held-out suite's answers."""
    cfg = ctx.settings.prompts
    if cfg.kind_sampling == "uniform" or not cfg.constraints_per_prompt:
        return None
    window = select(Prompt.iteration_id).where(Prompt.role == "train", Prompt.iteration_id < ctx.iteration_id)
    recent = sorted(set(session.scalars(window)))[-cfg.curriculum_iterations:]
    rows = session.execute(
        select(Prompt.constraints, Response.text)
        .join(Response, Response.prompt_id == Prompt.id)
        .where(Prompt.iteration_id.in_(recent), Prompt.role == "train", Response.kind == "policy")
    )
    observations = []
    for constraint_json, text in rows:
        for constraint in [Constraint.from_json(c) for c in constraint_json or []]:
            observations.append((constraint.kind, check(constraint, text)))
    kinds = cfg.constraint_kinds or sorted(KINDS)
    repairable = REPAIRABLE_KINDS if KIND_REPAIRED in ctx.settings.pairs.strategies else frozenset()
    return curriculum.learnability_weights(kinds, curriculum.tally(observations), repairable=repairable)


def _fitting_request(runtime: ModelRuntime, examples: list[str], per_cycle: int, max_new_tokens: int, topics: Sequence[str] = ()) -> str | None:
    """The self-instruct request with as many of ``examples`` as fit the context (the first ones
    dropped first), or None when not even one does: that round is skipped and counted."""
    for start in range(len(examples)):
        request = user_prompt(runtime, self_instruct.render_self_instruct_prompt(examples[start:], per_cycle, topics), max_new_tokens)
        if runtime.fits(request, max_new_tokens):
            return request
    return None
