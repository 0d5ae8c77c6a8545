"""Stage 2: N sampled answers per training prompt, and the RLCD positive/negative answers."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy.orm import Session

from daemon.db.models import Prompt, Response
from policies import principles
from workers.runtime import ModelRuntime
from daemon.stage_runs import StageContext, StageOutput
from workers.stages.common import parent_checkpoint, prompts_of_role, runtime_for, sample, stage_seed, user_prompt


def respond(ctx: StageContext) -> StageOutput:
    n = ctx.settings.respond.num_samples
    with ctx.sessions() as session:
        champion = parent_checkpoint(ctx, session)
        prompts = prompts_of_role(session, ctx.iteration_id, "train")
    runtime = runtime_for(ctx, champion.path)
    seed = stage_seed(ctx, "respond")
    rows: list[Response] = []
    if ctx.settings.pairs.strategy in ("self_reward", "both"):
        samples = sample(ctx, runtime, [user_prompt(runtime, p.text) for p in prompts], n=n, seed=seed)
        for prompt, outputs in zip(prompts, samples, strict=True):
            rows += [
                Response(iteration_id=ctx.iteration_id, prompt_id=prompt.id, kind="policy", sample_index=i, text=o.text, num_tokens=o.num_tokens)
                for i, o in enumerate(outputs)
            ]
    if ctx.settings.pairs.strategy in ("rlcd", "both"):
        rows += _rlcd_responses(ctx, runtime, prompts, seed + 1)

    def write(session: Session) -> dict[str, Any]:
        session.add_all(rows)
        return {}

    by_kind: dict[str, int] = defaultdict(int)
    for row in rows:
        by_kind[row.kind] += 1
    mean_tokens = sum(r.num_tokens for r in rows) / len(rows) if rows else 0.0
    return StageOutput({"responses": len(rows), **by_kind, "mean_tokens": round(mean_tokens, 2)}, write)


def _rlcd_responses(ctx: StageContext, runtime: ModelRuntime, prompts: list[Prompt], seed: int) -> list[Response]:
    texts, meta = [], []
    for index, prompt in enumerate(prompts):
        pair = principles.pick_principle(index)
        for positive in (True, False):
            texts.append(runtime.render_chat(principles.rlcd_messages(prompt.text, pair, positive)))
            meta.append((prompt, pair.name, "rlcd_positive" if positive else "rlcd_negative"))
    outputs = sample(ctx, runtime, texts, n=1, seed=seed)
    return [
        Response(iteration_id=ctx.iteration_id, prompt_id=p.id, kind=kind, principle=name, text=o[0].text, num_tokens=o[0].num_tokens)
        for (p, name, kind), o in zip(meta, outputs, strict=True)
    ]

