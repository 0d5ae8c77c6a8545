"""Stage 2: N sampled answers per training prompt, the RLCD positive/negative answers, and for the
anchored strategy N answers of the lineage's initial model.

The result reports the truncation rate (answers that hit generation.max_new_tokens before
ending; respond.end_bonus lowers it, policies/end_ramp.py) and, for constrained prompts, how
often a sample satisfies all its constraints."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy.orm import Session

from daemon.db.models import Prompt, Response
from policies import principles
from policies.constraints import Constraint, check_all
from policies.pairs import KIND_ANCHORED, KIND_ENDED, KIND_REPAIRED, KIND_RLCD, KIND_SELF_REWARD, KIND_VERIFIED
from policies.repetition import loops
from workers.generation import Generation
from workers.runtime import ModelRuntime
from daemon.db.lineage import lineage_root
from daemon.stage_runs import StageContext, StageOutput
from workers.stages.common import over_context, parent_checkpoint, prompts_of_role, sample, sampler_for, stage_seed, user_prompt

POLICY_STRATEGIES = {KIND_SELF_REWARD, KIND_VERIFIED, KIND_REPAIRED, KIND_ANCHORED, KIND_ENDED}


def respond(ctx: StageContext) -> StageOutput:
    n = ctx.settings.respond.num_samples
    strategies = set(ctx.settings.pairs.strategies)
    with ctx.sessions() as session:
        champion = parent_checkpoint(ctx, session)
        initial = lineage_root(session, champion)
        prompts = prompts_of_role(session, ctx.iteration_id, "train")
    runtime = sampler_for(ctx, champion.path)
    seed = stage_seed(ctx, "respond")
    policy_rows, rlcd_rows, finished, skipped = _policy_and_rlcd(ctx, runtime, prompts, strategies, seed)
    rows = policy_rows
    # Temporal Self-Rewarding's rejected answers come from the initial model; while the champion
    # is the initial model, its own samples serve (build_pairs reads them as the anchor).
    if KIND_ANCHORED in strategies and initial.id != champion.id:
        anchor_runtime = sampler_for(ctx, initial.path)
        anchor_out = sample(
            ctx, anchor_runtime, _policy_texts(anchor_runtime, prompts, ctx), n=n, seed=seed + 2, end_ramp=ctx.settings.respond.end_ramp(),
        )
        rows += _sample_rows(ctx, prompts, anchor_out, "anchor")
        skipped += over_context(anchor_out)
    rows += rlcd_rows

    def write(session: Session) -> dict[str, Any]:
        session.add_all(rows)
        return {}

    by_kind: dict[str, int] = defaultdict(int)
    for row in rows:
        by_kind[row.kind] += 1
    mean_tokens = sum(r.num_tokens for r in rows) / len(rows) if rows else 0.0
    result = {
        "responses": len(rows), **by_kind, "mean_tokens": round(mean_tokens, 2),
        "truncation_rate": _cut_share([ended for ended, _ in finished]),
        **({"sampled_truncation_rate": _cut_share([ended for ended, greedy in finished if not greedy]),
            "greedy_truncation_rate": _cut_share([ended for ended, greedy in finished if greedy])}
           if ctx.settings.respond.greedy_sample else {}),
        # Policy samples repeating a line or phrase 3+ times (policies.repetition.loops).
        "looping_rate": round(sum(loops(r.text) for r in policy_rows) / len(policy_rows), 4) if policy_rows else None,
        # Prompts (times strategies) that did not fit the context with room for the answer: skipped, not clipped.
        "skipped_over_context": skipped,
        **_satisfaction(prompts, [r for r in rows if r.kind == "policy"]),
    }
    return StageOutput(result, write)


def _cut_share(ended: list[bool]) -> float | None:
    return round(1 - sum(ended) / len(ended), 4) if ended else None


def _policy_and_rlcd(
    ctx: StageContext, runtime: ModelRuntime, prompts: list[Prompt], strategies: set[str], seed: int
) -> tuple[list[Response], list[Response], list[tuple[bool, bool]], int]:
    """Policy samples (N per prompt) and RLCD answers (one per steered request) in one decode call.

    Both come from the champion with the same budget, so one batched call serves them (measured:
    17% less CPU than two calls, issue 14). Returns the policy rows, the RLCD rows, whether each
    policy sample ended before max_new_tokens (and is the greedy one), and how many requests did not fit the context.
    With respond.greedy_sample each prompt's last policy sample (index num_samples) is its greedy answer.
    """
    policy = _policy_texts(runtime, prompts, ctx) if strategies & POLICY_STRATEGIES else []
    rlcd, meta = _rlcd_texts(runtime, prompts, ctx.settings.generation.max_new_tokens) if KIND_RLCD in strategies else ([], [])
    n = ctx.settings.respond.num_samples
    outputs = sample(ctx, runtime, policy + rlcd, n=[n] * len(policy) + [1] * len(rlcd), seed=seed, end_ramp=ctx.settings.respond.end_ramp())
    policy_out, rlcd_out = outputs[: len(policy)], outputs[len(policy) :]
    if policy and ctx.settings.respond.greedy_sample:
        # Greedy is one temperature for the whole call, so it is a call of its own; no end ramp,
        # so the sample is what the gate and the suites will see from this model.
        greedy = sample(ctx, runtime, policy, n=1, seed=seed + 3, temperature=0.0)
        policy_out = [sampled + extra for sampled, extra in zip(policy_out, greedy, strict=True)]
    policy_rows = _sample_rows(ctx, prompts, policy_out, "policy") if policy else []
    # Per policy sample, whether it ended, and whether it is a prompt's greedy sample (index n).
    finished = [(o.finished, index == n) for samples in policy_out for index, o in enumerate(samples)]
    return policy_rows, _rlcd_rows(ctx, meta, rlcd_out), finished, over_context(outputs)


def _policy_texts(runtime: ModelRuntime, prompts: list[Prompt], ctx: StageContext) -> list[str]:
    """Each prompt as the model's user turn, exactly as dpo_update renders it (same call, same budget)."""
    return [user_prompt(runtime, p.text, ctx.settings.generation.max_new_tokens) for p in prompts]


def _sample_rows(ctx: StageContext, prompts: list[Prompt], samples: list[list[Generation]], kind: str) -> list[Response]:
    """The answers of each prompt as Response rows of ``kind``, numbered by sample."""
    return [
        Response(iteration_id=ctx.iteration_id, prompt_id=prompt.id, kind=kind, sample_index=i, text=o.text, num_tokens=o.num_tokens)
        for prompt, outputs in zip(prompts, samples, strict=True)
        for i, o in enumerate(outputs)
    ]


def _satisfaction(prompts: list[Prompt], responses: list[Response]) -> dict[str, Any]:
    """How often a policy sample satisfies all of its prompt's constraints, and how many
    constrained prompts have both a passing and a failing sample (verified pairs available)."""
    constraints = {p.id: [Constraint.from_json(c) for c in (p.constraints or [])] for p in prompts}
    passes: dict[int, list[bool]] = defaultdict(list)
    for r in responses:
        if constraints.get(r.prompt_id):
            passes[r.prompt_id].append(all(check_all(constraints[r.prompt_id], r.text)))
    flags = [f for group in passes.values() for f in group]
    return {
        "constrained_prompts": sum(1 for c in constraints.values() if c),
        "satisfaction_rate": round(sum(flags) / len(flags), 4) if flags else None,
        "prompts_with_contrast": sum(1 for group in passes.values() if any(group) and not all(group)),
    }


def _rlcd_texts(runtime: ModelRuntime, prompts: list[Prompt], budget: int) -> tuple[list[str], list[tuple[Prompt, str, str]]]:
    """A positive and a negative principle-steered request per prompt, with (prompt, principle, kind) each."""
    texts, meta = [], []
    for index, prompt in enumerate(prompts):
        pair = principles.pick_principle(index)
        for positive in (True, False):
            texts.append(runtime.render_chat(principles.rlcd_messages(prompt.text, pair, positive), max_new_tokens=budget))
            meta.append((prompt, pair.name, "rlcd_positive" if positive else "rlcd_negative"))
    return texts, meta


def _rlcd_rows(ctx: StageContext, meta: list[tuple[Prompt, str, str]], outputs: list[list[Generation]]) -> list[Response]:
    return [
        Response(iteration_id=ctx.iteration_id, prompt_id=p.id, kind=kind, principle=name, text=o[0].text, num_tokens=o[0].num_tokens)
        for (p, name, kind), o in zip(meta, outputs, strict=True)
        if o
    ]
