"""The cycle's stages: model and DB side effects around the pure logic in ``policies``."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db import lineage
from daemon.db.models import Checkpoint, CheckpointStatus, Evaluation, Judgment, Pair, Prompt, Response
from policies import gate, pairs, principles, rubric, self_instruct
from policies.heldout import split_seed_prompts
from workers.runtime import ModelRuntime, get_runtime
from workers.stage_runner import StageContext, StageFn, StageOutput

STAGE_ORDER = ("generate_prompts", "respond", "judge", "build_pairs", "dpo_update", "evaluate_gate")
# Generation, judging and training hold a model; pair building is bookkeeping.
STAGE_QUEUES = {stage: "gpu" for stage in STAGE_ORDER} | {"build_pairs": "cpu"}


# ---------------------------------------------------------------- helpers


def _runtime_for(ctx: StageContext, checkpoint_path: str) -> ModelRuntime:
    device = None if ctx.settings.model.device == "auto" else ctx.settings.model.device
    return get_runtime(checkpoint_path, device=device)


def _parent_checkpoint(ctx: StageContext, session: Session) -> Checkpoint:
    iteration = ctx.iteration(session)
    checkpoint = session.get(Checkpoint, iteration.parent_checkpoint_id)
    assert checkpoint is not None, "iterations reference an existing checkpoint by foreign key"
    return checkpoint


def _stage_seed(ctx: StageContext, stage: str) -> int:
    # Deterministic per (config seed, iteration, stage): a re-run samples the same data.
    return (ctx.settings.seed * 1_000_003 + ctx.iteration_id * 101 + STAGE_ORDER.index(stage)) % (2**31)


def _prompts(session: Session, iteration_id: int, role: str) -> list[Prompt]:
    return list(
        session.scalars(select(Prompt).where(Prompt.iteration_id == iteration_id, Prompt.role == role).order_by(Prompt.id))
    )


def _sample(ctx: StageContext, runtime: ModelRuntime, texts: list[str], *, n: int, seed: int, **overrides: Any):
    g = ctx.settings.generation
    return runtime.generate(
        texts,
        num_samples=n,
        max_new_tokens=overrides.get("max_new_tokens", g.max_new_tokens),
        temperature=overrides.get("temperature", g.temperature),
        top_p=g.top_p,
        seed=seed,
        batch_size=g.batch_size,
    )


def _user(runtime: ModelRuntime, content: str) -> str:
    return runtime.render_chat([{"role": "user", "content": content}])


# ---------------------------------------------------------------- 1. generate_prompts


def generate_prompts(ctx: StageContext) -> StageOutput:
    cfg = ctx.settings.prompts
    with ctx.sessions() as session:
        champion = _parent_checkpoint(ctx, session)
        earlier = list(
            session.scalars(select(Prompt.text).where(Prompt.role == "train", Prompt.iteration_id != ctx.iteration_id))
        )
    seeds, heldout = split_seed_prompts(self_instruct.load_seed_prompts(), ctx.settings.gate.heldout_prompts)
    runtime = _runtime_for(ctx, champion.path)
    rng = random.Random(_stage_seed(ctx, "generate_prompts"))
    accepted: list[str] = []
    counts = {"parsed": 0, "filtered_out": 0, "duplicates": 0}
    for round_index in range(cfg.max_rounds):
        if len(accepted) >= cfg.per_cycle:
            break
        examples = self_instruct.select_few_shot(seeds, earlier + accepted, cfg.few_shot, rng)
        request = _user(runtime, self_instruct.render_self_instruct_prompt(examples, cfg.per_cycle))
        outputs = _sample(ctx, runtime, [request], n=2, seed=_stage_seed(ctx, "generate_prompts") + round_index)[0]
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


# ---------------------------------------------------------------- 2. respond


def respond(ctx: StageContext) -> StageOutput:
    n = ctx.settings.respond.num_samples
    with ctx.sessions() as session:
        champion = _parent_checkpoint(ctx, session)
        prompts = _prompts(session, ctx.iteration_id, "train")
    runtime = _runtime_for(ctx, champion.path)
    seed = _stage_seed(ctx, "respond")
    rows: list[Response] = []
    if ctx.settings.pairs.strategy in ("self_reward", "both"):
        samples = _sample(ctx, runtime, [_user(runtime, p.text) for p in prompts], n=n, seed=seed)
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
    outputs = _sample(ctx, runtime, texts, n=1, seed=seed)
    return [
        Response(iteration_id=ctx.iteration_id, prompt_id=p.id, kind=kind, principle=name, text=o[0].text, num_tokens=o[0].num_tokens)
        for (p, name, kind), o in zip(meta, outputs, strict=True)
    ]


# ---------------------------------------------------------------- 3. judge


def judge(ctx: StageContext) -> StageOutput:
    cfg = ctx.settings.judge
    with ctx.sessions() as session:
        champion = _parent_checkpoint(ctx, session)
        rows = session.execute(
            select(Response.id, Response.text, Prompt.text)
            .join(Prompt, Prompt.id == Response.prompt_id)
            .where(Response.iteration_id == ctx.iteration_id, Response.kind == "policy")
            .order_by(Response.id)
        ).all()
    runtime = _runtime_for(ctx, champion.path)
    requests = [_user(runtime, rubric.render_judge_prompt(prompt, answer)) for _, answer, prompt in rows]
    outputs = _sample(
        ctx, runtime, requests, n=cfg.num_samples, seed=_stage_seed(ctx, "judge"),
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
    ) if requests else []
    judgments: list[Judgment] = []
    for (response_id, answer, _), samples in zip(rows, outputs, strict=True):
        for index, sample in enumerate(samples):
            parsed = rubric.parse_judge_output(sample.text, answer)
            judgments.append(
                Judgment(
                    iteration_id=ctx.iteration_id, response_id=response_id, sample_index=index,
                    raw_output=sample.text, score=parsed.score,
                    parse_error=None if parsed.score is not None else parsed.reason[:256],
                )
            )

    def write(session: Session) -> dict[str, Any]:
        session.add_all(judgments)
        return {}

    scores = [j.score for j in judgments if j.score is not None]
    failures = len(judgments) - len(scores)
    result = {
        "judgments": len(judgments),
        "unparseable": failures,
        "parse_failure_rate": round(failures / len(judgments), 4) if judgments else 0.0,
        "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
    }
    return StageOutput(result, write)


# ---------------------------------------------------------------- 4. build_pairs


def build_pairs(ctx: StageContext) -> StageOutput:
    with ctx.sessions() as session:
        responses = list(session.scalars(select(Response).where(Response.iteration_id == ctx.iteration_id)))
        judgments = list(session.scalars(select(Judgment).where(Judgment.iteration_id == ctx.iteration_id)))
    scores_by_response: dict[int, list[float | None]] = defaultdict(list)
    for j in judgments:
        scores_by_response[j.response_id].append(j.score)
    scored: dict[str, list[pairs.ScoredResponse]] = defaultdict(list)
    rlcd: dict[int, dict[str, Response]] = defaultdict(dict)
    for r in responses:
        if r.kind == "policy":
            mean = rubric.mean_score(scores_by_response.get(r.id, []))
            scored[str(r.prompt_id)].append(pairs.ScoredResponse(str(r.id), r.text, mean))
        else:
            rlcd[r.prompt_id][r.kind] = r
    self_reward = pairs.build_self_reward_pairs(scored, ctx.settings.pairs.min_score_gap)
    rlcd_pairs = pairs.build_rlcd_pairs(
        [
            pairs.RlcdSample(str(pid), str(k["rlcd_positive"].id), k["rlcd_positive"].text, str(k["rlcd_negative"].id), k["rlcd_negative"].text)
            for pid, k in rlcd.items()
            if {"rlcd_positive", "rlcd_negative"} <= k.keys()
        ]
    )
    selected = pairs.select_pairs(ctx.settings.pairs.strategy, self_reward, rlcd_pairs)

    def write(session: Session) -> dict[str, Any]:
        session.add_all(
            Pair(
                iteration_id=ctx.iteration_id, prompt_id=int(p.prompt_id), chosen_response_id=int(p.chosen_id),
                rejected_response_id=int(p.rejected_id), kind=p.kind, score_gap=p.score_gap,
            )
            for p in selected
        )
        return {}

    result = {
        "pairs": len(selected),
        "self_reward_pairs": sum(p.kind == "self_reward" for p in selected),
        "rlcd_pairs": sum(p.kind == "rlcd" for p in selected),
    }
    return StageOutput(result, write)


# ---------------------------------------------------------------- 5. dpo_update


def dpo_update(ctx: StageContext) -> StageOutput:
    from workers.training import DPOSettings, PreferenceExample, dpo_update as train

    t = ctx.settings.training
    with ctx.sessions() as session:
        champion = _parent_checkpoint(ctx, session)
        rows = session.execute(
            select(Prompt.text, Pair.chosen_response_id, Pair.rejected_response_id)
            .join(Prompt, Prompt.id == Pair.prompt_id)
            .where(Pair.iteration_id == ctx.iteration_id)
            .order_by(Pair.id)
        ).all()
        texts = dict(session.execute(select(Response.id, Response.text).where(Response.iteration_id == ctx.iteration_id)).all())
    if len(rows) < t.min_pairs:
        return StageOutput({"skipped": f"{len(rows)} pairs, fewer than training.min_pairs={t.min_pairs}", "pairs": len(rows)})
    examples = [
        PreferenceExample(prompt=prompt, chosen=texts[c], rejected=texts[r])
        for prompt, c, r in rows
    ]
    checkpoint_id = lineage.candidate_checkpoint_id(ctx.iteration_id)
    out_dir = ctx.settings.artifacts_dir / "checkpoints" / checkpoint_id
    settings = DPOSettings(
        beta=t.beta, learning_rate=t.learning_rate, epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lora_r=t.lora_r, lora_alpha=t.lora_alpha,
        max_length=t.max_length, seed=_stage_seed(ctx, "dpo_update"),
    )
    trained = train(champion.path, examples, out_dir, settings)

    def write(session: Session) -> dict[str, Any]:
        parent = _parent_checkpoint(ctx, session)
        session.merge(
            Checkpoint(
                id=checkpoint_id, parent_id=parent.id, base_model=parent.base_model, path=str(trained.checkpoint_path),
                adapter_path=str(trained.adapter_path), status=CheckpointStatus.candidate,
                created_iteration_id=ctx.iteration_id, metrics=_jsonable(trained.metrics),
            )
        )
        session.flush()
        ctx.iteration(session).candidate_checkpoint_id = checkpoint_id
        return {}

    result = {"checkpoint_id": checkpoint_id, "pairs": len(rows), "train_seconds": round(trained.train_seconds, 3), **_jsonable(trained.metrics)}
    return StageOutput(result, write)


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(float(v), 6) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}


# ---------------------------------------------------------------- 6. evaluate_gate


def evaluate_gate(ctx: StageContext) -> StageOutput:
    g = ctx.settings.gate
    rule = gate.GateRule(
        min_win_rate_lower_bound=g.min_win_rate_lower_bound, z=g.z, min_comparisons=g.min_comparisons,
        max_length_ratio=g.max_length_ratio, max_parse_failure_rate=g.max_parse_failure_rate,
    )
    with ctx.sessions() as session:
        iteration = ctx.iteration(session)
        champion = _parent_checkpoint(ctx, session)
        candidate = session.get(Checkpoint, iteration.candidate_checkpoint_id) if iteration.candidate_checkpoint_id else None
        heldout = [p.text for p in _prompts(session, ctx.iteration_id, "heldout")]
    if candidate is None:
        return _no_candidate_decision(ctx, champion.id)
    comparisons, stats = _compare(ctx, champion.path, candidate.path, heldout)
    decision = gate.decide(stats, rule)

    def write(session: Session) -> dict[str, Any]:
        _record_evaluation(session, ctx.iteration_id, candidate.id, champion.id, decision, stats, comparisons)
        reason = "; ".join(decision.reasons)
        if decision.promote:
            lineage.promote(session, candidate.id, actor="gate", reason=reason, iteration_id=ctx.iteration_id)
        else:
            lineage.reject(session, candidate.id, actor="gate", reason=reason, iteration_id=ctx.iteration_id)
        ctx.iteration(session).decision = "promoted" if decision.promote else "rejected"
        return {}

    return StageOutput({"decision": "promoted" if decision.promote else "rejected", **decision.as_dict()}, write)


def _compare(ctx: StageContext, champion_path: str, candidate_path: str, prompts: list[str]):
    seed = _stage_seed(ctx, "evaluate_gate")
    champion_rt = _runtime_for(ctx, champion_path)
    candidate_rt = _runtime_for(ctx, candidate_path)
    champion_out = [o[0] for o in _sample(ctx, champion_rt, [_user(champion_rt, p) for p in prompts], n=1, seed=seed)]
    candidate_out = [o[0] for o in _sample(ctx, candidate_rt, [_user(candidate_rt, p) for p in prompts], n=1, seed=seed)]
    # The champion judges: it is frozen relative to the candidate, which limits self-preference.
    requests = []
    for prompt, cand, champ in zip(prompts, candidate_out, champion_out, strict=True):
        requests.append(_user(champion_rt, rubric.render_pairwise_prompt(prompt, cand.text, champ.text)))
        requests.append(_user(champion_rt, rubric.render_pairwise_prompt(prompt, champ.text, cand.text)))
    j = ctx.settings.judge
    verdict_texts = [o[0].text for o in _sample(ctx, champion_rt, requests, n=1, seed=seed + 1, max_new_tokens=j.max_new_tokens, temperature=j.temperature)]
    comparisons, combined = [], []
    for index, prompt in enumerate(prompts):
        first = rubric.parse_pairwise_verdict(verdict_texts[2 * index])
        second = rubric.parse_pairwise_verdict(verdict_texts[2 * index + 1])
        outcome = gate.combine_two_orders(first, second)
        combined.append(outcome)
        comparisons.append({"prompt": prompt, "candidate_first": first, "champion_first": second, "outcome": outcome})
    stats = gate.tally(combined, [o.num_tokens for o in candidate_out], [o.num_tokens for o in champion_out])
    return comparisons, stats


def _record_evaluation(session: Session, iteration_id: int, candidate_id: str | None, champion_id: str, decision, stats, comparisons) -> None:
    session.add(
        Evaluation(
            iteration_id=iteration_id, candidate_id=candidate_id, champion_id=champion_id, promote=decision.promote,
            wins=stats.wins, losses=stats.losses, ties=stats.ties, unparseable=stats.unparseable,
            win_rate=decision.win_rate, win_rate_lower_bound=decision.win_rate_lower_bound,
            length_ratio=decision.length_ratio, parse_failure_rate=decision.parse_failure_rate,
            reasons={"reasons": list(decision.reasons)}, comparisons={"items": comparisons},
        )
    )


def _no_candidate_decision(ctx: StageContext, champion_id: str) -> StageOutput:
    reason = "no candidate checkpoint: too few preference pairs to train"

    def write(session: Session) -> dict[str, Any]:
        session.add(
            Evaluation(iteration_id=ctx.iteration_id, candidate_id=None, champion_id=champion_id, promote=False, reasons={"reasons": [reason]}, comparisons={"items": []})
        )
        ctx.iteration(session).decision = "skipped"
        return {}

    return StageOutput({"decision": "skipped", "reasons": [reason]}, write)


STAGES: dict[str, StageFn] = {
    "generate_prompts": generate_prompts,
    "respond": respond,
    "judge": judge,
    "build_pairs": build_pairs,
    "dpo_update": dpo_update,
    "evaluate_gate": evaluate_gate,
}
