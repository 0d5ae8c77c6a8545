"""The cycle's stages: model and DB side effects around the pure logic in ``policies``."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db import lineage

if TYPE_CHECKING:
    from daemon.config import Settings
from daemon.db.models import Checkpoint, CheckpointStatus, Evaluation, Event, Judgment, Pair, Prompt, Response, StageRun, StageStatus
from policies import gate, judge_metrics, pairs, principles, rubric, self_instruct
from policies.heldout import split_seed_prompts
from workers import artifacts
from workers.checkpoints import CheckpointError
from workers.runtime import ModelRuntime, configure_cpu_threads, get_runtime
from workers.stage_runner import StageContext, StageFn, StageOutput

STAGE_ORDER = (
    "generate_prompts", "respond", "judge", "build_pairs", "steerlm_sft", "genarm_train", "dpo_update", "evaluate_gate",
)
# Run only when their config section says `enabled: true`; an iteration's stage rows, created when
# it starts, say which stages it has.
OPTIONAL_STAGES = {"steerlm_sft": "steerlm", "genarm_train": "genarm"}
CORE_STAGES = tuple(s for s in STAGE_ORDER if s not in OPTIONAL_STAGES)
# Generation, judging and training hold a model; pair building is bookkeeping.
STAGE_QUEUES = {stage: "gpu" for stage in STAGE_ORDER} | {"build_pairs": "cpu"}


def stages_for(settings: Settings) -> tuple[str, ...]:
    """The stages an iteration started with ``settings`` runs, in order."""
    return tuple(s for s in STAGE_ORDER if s not in OPTIONAL_STAGES or getattr(settings, OPTIONAL_STAGES[s]).enabled)

log = structlog.get_logger(__name__)


# ---------------------------------------------------------------- helpers


def _runtime_for(ctx: StageContext, checkpoint_path: str) -> ModelRuntime:
    configure_cpu_threads(ctx.settings.model.cpu_threads)
    device = None if ctx.settings.model.device == "auto" else ctx.settings.model.device
    # A checkpoint kaizen wrote is verified against its manifest (and fetched if remote) first.
    return get_runtime(artifacts.model_path_for_loading(ctx.settings, checkpoint_path), device=device)


def _parent_checkpoint(ctx: StageContext, session: Session) -> Checkpoint:
    iteration = ctx.iteration(session)
    checkpoint = session.get(Checkpoint, iteration.parent_checkpoint_id)
    assert checkpoint is not None, "iterations reference an existing checkpoint by foreign key"
    return checkpoint


def _steerlm_checkpoint(ctx: StageContext, session: Session) -> Checkpoint | None:
    """The attribute-conditioned SFT of the parent, if this iteration's steerlm_sft made one:
    DPO then starts from it, so the candidate keeps the SteerLM conditioning."""
    row = session.scalars(
        select(StageRun).where(StageRun.iteration_id == ctx.iteration_id, StageRun.stage == "steerlm_sft", StageRun.status == StageStatus.succeeded)
    ).one_or_none()
    checkpoint_id = row.result.get("checkpoint_id") if row is not None and not row.result.get("skipped") else None
    return session.get(Checkpoint, checkpoint_id) if checkpoint_id else None


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
            select(Response.id, Response.text, Response.num_tokens, Prompt.text)
            .join(Prompt, Prompt.id == Response.prompt_id)
            .where(Response.iteration_id == ctx.iteration_id, Response.kind == "policy")
            .order_by(Response.id)
        ).all()
    runtime = _runtime_for(ctx, champion.path)
    requests = [_user(runtime, rubric.render_judge_prompt(prompt, answer)) for _, answer, _, prompt in rows]
    if cfg.mode == rubric.JUDGE_MODE_LOGPROB:
        judgments, metrics = _judge_by_logprob(ctx, runtime, [r[0] for r in rows], requests)
    else:
        judgments, metrics = _judge_by_text(ctx, runtime, [(r[0], r[1]) for r in rows], requests)
    scores_by_response: dict[int, list[float | None]] = defaultdict(list)
    for j in judgments:
        scores_by_response[j.response_id].append(j.score)
    metrics["length_correlation"] = judge_metrics.score_length_correlation(
        (rubric.mean_score(scores_by_response[response_id]), num_tokens) for response_id, _, num_tokens, _ in rows
    )
    warnings = judge_metrics.judge_warnings(metrics, _warning_thresholds(ctx))

    def write(session: Session) -> dict[str, Any]:
        session.add_all(judgments)
        _record_warnings(session, ctx, champion.id, warnings)
        return {}

    scores = [j.score for j in judgments if j.score is not None]
    failures = len(judgments) - len(scores)
    result = {
        "mode": cfg.mode,
        "judgments": len(judgments),
        "unparseable": failures,
        "parse_failure_rate": round(failures / len(judgments), 4) if judgments else 0.0,
        "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
        judge_metrics.JUDGE_METRICS_KEY: judge_metrics.rounded(metrics),
        "warnings": warnings,
    }
    return StageOutput(result, write)


def _judge_by_text(
    ctx: StageContext, runtime: ModelRuntime, responses: list[tuple[int, str]], requests: list[str]
) -> tuple[list[Judgment], dict[str, Any]]:
    """K sampled judgments per response, the score parsed from each (policies.rubric)."""
    cfg = ctx.settings.judge
    outputs = _sample(
        ctx, runtime, requests, n=cfg.num_samples, seed=_stage_seed(ctx, "judge"),
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
    ) if requests else []
    judgments: list[Judgment] = []
    samples_per_response: list[list[float | None]] = []
    for (response_id, answer), samples in zip(responses, outputs, strict=True):
        parsed = [rubric.parse_judge_output(sample.text, answer) for sample in samples]
        samples_per_response.append([p.score for p in parsed])
        judgments += [
            Judgment(
                iteration_id=ctx.iteration_id, response_id=response_id, sample_index=index,
                raw_output=sample.text, score=p.score, parse_error=None if p.score is not None else p.reason[:256],
            )
            for index, (sample, p) in enumerate(zip(samples, parsed, strict=True))
        ]
    metrics = {
        "parse_failure_rate": judge_metrics.parse_failure_rate([j.score for j in judgments]),
        "self_agreement": judge_metrics.sample_agreement(samples_per_response),
        "self_agreement_basis": "samples",
    }
    return judgments, metrics


def _judge_by_logprob(
    ctx: StageContext, runtime: ModelRuntime, response_ids: list[int], requests: list[str]
) -> tuple[list[Judgment], dict[str, Any]]:
    """One exact judgment per response: the expected score under P(1..5) after the "Score:" cue.

    The distribution is computed, not sampled, so K samples would all be equal; self-agreement
    is the probability that two draws from it agree (policies.judge_metrics.distribution_agreement).
    """
    cues = [request + rubric.SCORE_CUE for request in requests]
    batch = ctx.settings.generation.batch_size
    distributions = runtime.continuation_distribution(cues, rubric.SCORE_CONTINUATIONS, batch_size=batch) if cues else []
    judgments = []
    for response_id, d in zip(response_ids, distributions, strict=True):
        score = rubric.expected_score(d.probabilities)
        summary = f"{score:.3f} (score tokens held {d.mass:.1%} of the next-token probability)"
        judgments.append(
            Judgment(
                iteration_id=ctx.iteration_id, response_id=response_id, sample_index=0,
                raw_output=rubric.describe_distribution(rubric.SCORE_CONTINUATIONS, d.probabilities, summary), score=score,
            )
        )
    metrics = {
        "parse_failure_rate": 0.0 if judgments else None,
        "self_agreement": judge_metrics.distribution_agreement(d.probabilities for d in distributions),
        "self_agreement_basis": "distribution",
        "score_token_mass": judge_metrics.mean_or_none(d.mass for d in distributions),
    }
    return judgments, metrics


def _warning_thresholds(ctx: StageContext) -> judge_metrics.WarningThresholds:
    return judge_metrics.WarningThresholds(**ctx.settings.judge.warnings.model_dump())


def _record_warnings(session: Session, ctx: StageContext, checkpoint_id: str, warnings: list[str]) -> None:
    for line in warnings:
        log.warning("judge.warning", iteration_id=ctx.iteration_id, warning=line)
        session.add(
            Event(
                kind=judge_metrics.WARNING_EVENT_KIND, checkpoint_id=checkpoint_id, iteration_id=ctx.iteration_id,
                actor="judge_metrics", reason=line,
            )
        )


# ---------------------------------------------------------------- 4. build_pairs


def build_pairs(ctx: StageContext) -> StageOutput:
    cfg = ctx.settings.pairs
    with ctx.sessions() as session:
        champion = _parent_checkpoint(ctx, session)
        responses = list(session.scalars(select(Response).where(Response.iteration_id == ctx.iteration_id)))
        judgments = list(session.scalars(select(Judgment).where(Judgment.iteration_id == ctx.iteration_id)))
        gap_history = _earlier_score_gaps(session, ctx.iteration_id)
    scores_by_response: dict[int, list[float | None]] = defaultdict(list)
    for j in judgments:
        scores_by_response[j.response_id].append(j.score)
    lengths = {str(r.id): r.num_tokens for r in responses}
    scored: dict[str, list[pairs.ScoredResponse]] = defaultdict(list)
    rlcd: dict[int, dict[str, Response]] = defaultdict(dict)
    for r in responses:
        if r.kind == "policy":
            mean = rubric.mean_score(scores_by_response.get(r.id, []))
            scored[str(r.prompt_id)].append(pairs.ScoredResponse(str(r.id), r.text, mean, r.num_tokens))
        else:
            rlcd[r.prompt_id][r.kind] = r
    if cfg.length_normalise:
        scored = pairs.length_normalised(scored)
    self_reward = pairs.build_self_reward_pairs(scored, cfg.min_score_gap)
    rlcd_pairs = pairs.build_rlcd_pairs(
        [
            pairs.RlcdSample(str(pid), str(k["rlcd_positive"].id), k["rlcd_positive"].text, str(k["rlcd_negative"].id), k["rlcd_negative"].text)
            for pid, k in rlcd.items()
            if {"rlcd_positive", "rlcd_negative"} <= k.keys()
        ]
    )
    selected = pairs.select_pairs(cfg.strategy, self_reward, rlcd_pairs)
    dropped: list[pairs.PreferencePair] = []
    if cfg.max_length_ratio is not None:
        selected, dropped = pairs.cap_length_ratio(selected, lengths, cfg.max_length_ratio)
    metrics = judge_metrics.pair_gaps((p.score_gap, lengths[p.chosen_id], lengths[p.rejected_id]) for p in selected)
    warnings = judge_metrics.judge_warnings(metrics, _warning_thresholds(ctx), gap_history)

    def write(session: Session) -> dict[str, Any]:
        session.add_all(
            Pair(
                iteration_id=ctx.iteration_id, prompt_id=int(p.prompt_id), chosen_response_id=int(p.chosen_id),
                rejected_response_id=int(p.rejected_id), kind=p.kind, score_gap=p.score_gap,
            )
            for p in selected
        )
        _record_warnings(session, ctx, champion.id, warnings)
        return {}

    result = {
        "pairs": len(selected),
        "self_reward_pairs": sum(p.kind == "self_reward" for p in selected),
        "rlcd_pairs": sum(p.kind == "rlcd" for p in selected),
        "dropped_by_length_cap": len(dropped),
        "length_normalised": cfg.length_normalise,
        judge_metrics.JUDGE_METRICS_KEY: judge_metrics.rounded(metrics),
        "warnings": warnings,
    }
    return StageOutput(result, write)


def _earlier_score_gaps(session: Session, iteration_id: int, limit: int = 100) -> list[float | None]:
    """The mean score gap of the iterations before this one, oldest first."""
    results = session.scalars(
        select(StageRun.result)
        .where(StageRun.stage == "build_pairs", StageRun.status == StageStatus.succeeded, StageRun.iteration_id < iteration_id)
        .order_by(StageRun.iteration_id.desc())
        .limit(limit)
    ).all()
    return [(r.get(judge_metrics.JUDGE_METRICS_KEY) or {}).get("mean_score_gap") for r in reversed(results)]


# ---------------------------------------------------------------- 5. dpo_update


def dpo_update(ctx: StageContext) -> StageOutput:
    from workers.training import ADAPTER_SUBDIR, DPOSettings, PreferenceExample, dpo_update as train

    t = ctx.settings.training
    with ctx.sessions() as session:
        champion = _steerlm_checkpoint(ctx, session) or _parent_checkpoint(ctx, session)
        # "initial" keeps the lineage's first model as the KL anchor across rounds, so drift is
        # measured from where the loop started rather than from the last champion.
        reference = _lineage_root(session, champion) if t.reference == "initial" else champion
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
    out_dir = artifacts.checkpoint_staging_dir(ctx.settings, checkpoint_id)
    dataset_uri = artifacts.write_dataset(
        ctx.settings, ctx.iteration_id, "preference_pairs.jsonl",
        ({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples),
    )
    settings = DPOSettings(
        beta=t.beta, learning_rate=t.learning_rate, epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lora_r=t.lora_r, lora_alpha=t.lora_alpha,
        max_length=t.max_length, seed=_stage_seed(ctx, "dpo_update"),
    )
    # The champion as reference needs no second model: dpo_update disables the adapter instead.
    reference_path = artifacts.model_path_for_loading(ctx.settings, reference.path) if reference.id != champion.id else None
    base_path = artifacts.model_path_for_loading(ctx.settings, champion.path)
    configure_cpu_threads(ctx.settings.model.cpu_threads)
    trained = train(base_path, examples, out_dir, settings, reference_model_path=reference_path)
    # Under a remote artifacts_url this uploads the checkpoint (manifest last); locally it is in place.
    checkpoint_uri = artifacts.publish_checkpoint(ctx.settings, trained.checkpoint_path, checkpoint_id)

    def write(session: Session) -> dict[str, Any]:
        parent = _steerlm_checkpoint(ctx, session) or _parent_checkpoint(ctx, session)
        session.merge(
            Checkpoint(
                id=checkpoint_id, parent_id=parent.id, base_model=parent.base_model, path=checkpoint_uri,
                adapter_path=artifacts.join_uri(checkpoint_uri, ADAPTER_SUBDIR), status=CheckpointStatus.candidate,
                created_iteration_id=ctx.iteration_id, metrics=_jsonable(trained.metrics),
            )
        )
        session.flush()
        ctx.iteration(session).candidate_checkpoint_id = checkpoint_id
        return {}

    result = {
        "checkpoint_id": checkpoint_id, "pairs": len(rows), "reference": reference.id, "dataset": dataset_uri,
        "train_seconds": round(trained.train_seconds, 3), **_jsonable(trained.metrics),
    }
    return StageOutput(result, write)


def _lineage_root(session: Session, checkpoint: Checkpoint) -> Checkpoint:
    """The first model of ``checkpoint``'s lineage (following parents to the one without)."""
    seen = {checkpoint.id}
    while checkpoint.parent_id is not None:
        parent = session.get(Checkpoint, checkpoint.parent_id)
        assert parent is not None and parent.id not in seen, "checkpoint parents form a tree by foreign key"
        seen.add(parent.id)
        checkpoint = parent
    return checkpoint


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
    refusal = _unloadable_checkpoint(ctx, candidate.path)
    if refusal is not None:
        return _refused_candidate_decision(ctx, candidate.id, champion.id, refusal)
    comparisons, stats = _compare(ctx, champion.path, candidate.path, heldout)
    decision = gate.decide(stats, rule)
    metrics = {
        "position_bias_rate": judge_metrics.position_bias_rate((c["candidate_first"], c["champion_first"]) for c in comparisons)
    }
    warnings = judge_metrics.judge_warnings(metrics, _warning_thresholds(ctx))

    def write(session: Session) -> dict[str, Any]:
        _record_evaluation(session, ctx.iteration_id, candidate.id, champion.id, decision, stats, comparisons)
        _record_warnings(session, ctx, champion.id, warnings)
        reason = "; ".join(decision.reasons)
        # An operator's promote/rollback during this cycle wins over a candidate trained on the old champion.
        blocked = lineage.gate_promotion_blocker(session, champion.id) if decision.promote else None
        if decision.promote and not blocked:
            lineage.promote(session, candidate.id, actor="gate", reason=reason, iteration_id=ctx.iteration_id)
        else:
            reason = f"{reason}; not promoted: {blocked}" if blocked else reason
            lineage.reject(session, candidate.id, actor="gate", reason=reason, iteration_id=ctx.iteration_id)
        ctx.iteration(session).decision = "promoted" if decision.promote and not blocked else "rejected"
        return {}

    result = {
        "decision": "promoted" if decision.promote else "rejected", **decision.as_dict(),
        judge_metrics.JUDGE_METRICS_KEY: judge_metrics.rounded(metrics), "warnings": warnings,
    }
    return StageOutput(result, write)


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
    verdicts, details = _pairwise_verdicts(ctx, champion_rt, requests, seed + 1)
    comparisons, combined = [], []
    for index, prompt in enumerate(prompts):
        first, second = verdicts[2 * index], verdicts[2 * index + 1]
        outcome = gate.combine_two_orders(first, second)
        combined.append(outcome)
        comparisons.append(
            {"prompt": prompt, "candidate_first": first, "champion_first": second, "outcome": outcome, **details[index]}
        )
    stats = gate.tally(combined, [o.num_tokens for o in candidate_out], [o.num_tokens for o in champion_out])
    return comparisons, stats


def _pairwise_verdicts(
    ctx: StageContext, judge_rt: ModelRuntime, requests: list[str], seed: int
) -> tuple[list[str | None], list[dict[str, Any]]]:
    """The judge's verdict ("A", "B", "tie" or None if unreadable) on each pairwise request, in
    judge.mode, and per comparison (two consecutive requests) what to keep in the lineage."""
    j = ctx.settings.judge
    if j.mode == rubric.JUDGE_MODE_LOGPROB:
        cues = [request + rubric.VERDICT_CUE for request in requests]
        distributions = judge_rt.continuation_distribution(cues, rubric.VERDICT_CONTINUATIONS, batch_size=ctx.settings.generation.batch_size) if cues else []
        verdicts: list[str | None] = [rubric.verdict_from_distribution(d.probabilities) for d in distributions]
        details = [
            {
                "candidate_first_p": [round(p, 4) for p in distributions[i].probabilities],
                "champion_first_p": [round(p, 4) for p in distributions[i + 1].probabilities],
            }
            for i in range(0, len(distributions), 2)
        ]
        return verdicts, details
    texts = [o[0].text for o in _sample(ctx, judge_rt, requests, n=1, seed=seed, max_new_tokens=j.max_new_tokens, temperature=j.temperature)]
    return [rubric.parse_pairwise_verdict(text) for text in texts], [{} for _ in range(len(texts) // 2)]


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


def _unloadable_checkpoint(ctx: StageContext, path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded (missing, truncated, corrupted), or None."""
    try:
        artifacts.model_path_for_loading(ctx.settings, path)
    except CheckpointError as exc:
        return str(exc)
    return None


def _refused_candidate_decision(ctx: StageContext, candidate_id: str, champion_id: str, problem: str) -> StageOutput:
    """A candidate that fails verification is rejected, so it can never be promoted, even by hand."""
    reason = f"candidate checkpoint refused at load: {problem}"

    def write(session: Session) -> dict[str, Any]:
        session.add(
            Evaluation(iteration_id=ctx.iteration_id, candidate_id=candidate_id, champion_id=champion_id, promote=False, reasons={"reasons": [reason]}, comparisons={"items": []})
        )
        lineage.reject(session, candidate_id, actor="gate", reason=reason, iteration_id=ctx.iteration_id)
        ctx.iteration(session).decision = "rejected"
        return {}

    return StageOutput({"decision": "rejected", "reasons": [reason]}, write)


def steerlm_sft(ctx: StageContext) -> StageOutput:
    from workers.steerlm import SteerLMSettings, steerlm_sft as run

    section = ctx.settings.steerlm.model_dump(exclude={"enabled"})
    return run(ctx, SteerLMSettings(**section))


def genarm_train(ctx: StageContext) -> StageOutput:
    from workers.genarm import ArmTrainSettings, genarm_train as run

    section = ctx.settings.genarm.model_dump(exclude={"enabled", "base_model_path"})
    return run(ctx, settings=ArmTrainSettings(**section, seed=_stage_seed(ctx, "genarm_train")), reward_base_path=ctx.settings.genarm.base_model_path)


STAGES: dict[str, StageFn] = {
    "generate_prompts": generate_prompts,
    "respond": respond,
    "judge": judge,
    "build_pairs": build_pairs,
    "steerlm_sft": steerlm_sft,
    "genarm_train": genarm_train,
    "dpo_update": dpo_update,
    "evaluate_gate": evaluate_gate,
}
