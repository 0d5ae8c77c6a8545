"""Stage 1: the champion writes new training tasks (self-instruct), topped up from unused seeds."""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Prompt
from policies import self_instruct
from policies.heldout import split_seed_prompts
from daemon.stage_runs import StageContext, StageOutput
from workers.stages.common import parent_checkpoint, runtime_for, sample, stage_seed, user_prompt


def generate_prompts(ctx: StageContext) -> StageOutput:
    cfg = ctx.settings.prompts
    with ctx.sessions() as session:
        champion = parent_checkpoint(ctx, session)
        earlier = list(
            session.scalars(select(Prompt.text).where(Prompt.role == "train", Prompt.iteration_id != ctx.iteration_id))
        )
    seeds, heldout = split_seed_prompts(self_instruct.load_seed_prompts(), ctx.settings.gate.heldout_prompts)
    runtime = runtime_for(ctx, champion.path)
    rng = random.Random(stage_seed(ctx, "generate_prompts"))
    accepted: list[str] = []
    counts = {"parsed": 0, "filtered_out": 0, "duplicates": 0}
    for round_index in range(cfg.max_rounds):
        if len(accepted) >= cfg.per_cycle:
            break
        examples = self_instruct.select_few_shot(seeds, earlier + accepted, cfg.few_shot, rng)
        request = user_prompt(runtime, self_instruct.render_self_instruct_prompt(examples, cfg.per_cycle))
        outputs = sample(ctx, runtime, [request], n=2, seed=stage_seed(ctx, "generate_prompts") + round_index)[0]
        for output in outputs:
            parsed = self_instruct.parse_generated_prompts(output.text)
            kept = self_instruct.filter_prompts(parsed, min_words=cfg.min_words, max_words=cfg.max_words)
            fresh = self_instruct.deduplicate(kept, seeds + heldout + earlier + accepted, max_overlap=cfg.max_overlap)
            counts["parsed"] += len(parsed)
            counts["filtered_out"] += len(parsed) - len(kept)
            counts["duplicates"] += len(kept) - len(fresh)
            accepted.extend(fresh[: cfg.per_cycle - len(accepted)])
    generated = len(accepted)
    # A weak model may not yet write usable tasks; unused seed prompts keep the cycle fed, and
    # the source column says which prompts the model wrote itself.
    unused_seeds = [s for s in seeds if s not in set(earlier)]
    rng.shuffle(unused_seeds)
    topped_up = unused_seeds[: cfg.per_cycle - generated]

    def write(session: Session) -> dict[str, Any]:
        rows = [Prompt(iteration_id=ctx.iteration_id, text=t, role="train", source="generated") for t in accepted]
        rows += [Prompt(iteration_id=ctx.iteration_id, text=t, role="train", source="seed") for t in topped_up]
        rows += [Prompt(iteration_id=ctx.iteration_id, text=t, role="heldout", source="seed") for t in heldout]
        session.add_all(rows)
        return {}

    result = {"generated": generated, "from_seed": len(topped_up), "heldout": len(heldout), **counts}
    return StageOutput(result, write)

