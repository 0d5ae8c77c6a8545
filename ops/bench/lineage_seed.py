"""A synthetic lineage shaped like the real one, written through the migrated schema without
running cycles: checkpoints, iterations with their stage runs and results, prompts, responses,
judgments, pairs, gate evaluations and events.

Used by the dashboard benchmark (ops.bench.dashboard), the dashboard and CLI tests and
ops/screenshot_dashboard.py. The same ``seed`` gives the same rows: every random draw happens in
a fixed order, so the functions below must keep theirs (the tests pick seeds by what they give).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, text

from daemon.config import Settings
from daemon.db import lineage
from daemon.db.models import (
    Base, Checkpoint, CheckpointStatus, Evaluation, Event, Iteration, IterationStatus, Judgment, Pair, Prompt, Response,
    StageRun, StageStatus,
)
from daemon.stage_specs import CORE_STAGES
from policies import gate
from policies.self_instruct import load_seed_prompts

POLICY_SAMPLES = 4  # respond.num_samples
JUDGE_SAMPLES = 2  # judge.num_samples
HELDOUT = 16
BASE_MODEL = "my-instruct-model"
# Typical compute seconds of each stage on a real GPU model; the seeded values vary around them.
STAGE_SECONDS = {"generate_prompts": 40.0, "respond": 120.0, "judge": 150.0, "build_pairs": 0.8, "dpo_update": 300.0, "evaluate_gate": 90.0, "evaluate_suites": 0.5}
# A no-op without a promotion; added after the seeded lineage's shape was fixed by its rng draws.
FIXED_TIME_STAGES = ("evaluate_suites",)
TABLES = (Iteration, StageRun, Prompt, Response, Judgment, Pair, Checkpoint, Evaluation, Event)
# Checkpoints and iterations reference each other: checkpoints go in first, linked afterwards.
INSERT_ORDER = ("checkpoints", "iterations", "stage_runs", "prompts", "responses", "judgments", "pairs", "evaluations", "events")


@dataclass
class SeedSummary:
    iterations: int
    judgments: int
    champion: str
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _State:
    """What carries from one seeded iteration to the next."""

    champion: str
    next_prompt_id: int = 1
    next_response_id: int = 1
    skill: float = 0.45  # the true chance that a candidate beats its parent; drifts over time


@dataclass(frozen=True)
class _StageTime:
    stage: str
    started: datetime
    finished: datetime
    seconds: float


@dataclass
class _Tally:
    """What an iteration's prompts added up to, for its stage results."""

    judged: int = 0
    scores: list[float | None] = field(default_factory=list)
    tokens: int = 0
    responses: int = 0
    pairs: int = 0


@dataclass(frozen=True)
class _Draw:
    """One iteration's identity and randomness shared by its rows."""

    number: int
    parent: str
    candidate: str | None
    quality: float
    prompts: list[str]


def _table(name: str) -> Table:
    return Base.metadata.tables[name]


class _Rows:
    """Rows for a batch of iterations, keyed by table, inserted in foreign-key order."""

    def __init__(self) -> None:
        self.by_table: dict[str, list[dict[str, Any]]] = {m.__tablename__: [] for m in TABLES}

    def add(self, model: type, **values: Any) -> None:
        self.by_table[model.__tablename__].append(values)

    def flush(self, conn: Connection, counts: dict[str, int]) -> None:
        links = [(c["id"], c.pop("created_iteration_id")) for c in self.by_table["checkpoints"]]
        for name in INSERT_ORDER:
            rows = self.by_table[name]
            if rows:
                conn.execute(_table(name).insert(), rows)
                counts[name] = counts.get(name, 0) + len(rows)
        if links:
            table = _table("checkpoints")
            conn.execute(
                table.update().where(table.c.id == bindparam("cid")).values(created_iteration_id=bindparam("iid")),
                [{"cid": cid, "iid": iid} for cid, iid in links],
            )
        self.__init__()


# ---------------------------------------------------------------- one iteration's rows


def _score(rng: random.Random, quality: float) -> float | None:
    if rng.random() < 0.08:
        return None  # an unparseable judgment: recorded, never imputed
    return float(min(5, max(1, round(rng.gauss(1.5 + 3 * quality, 0.9)))))


def _stage_times(started: datetime, rng: random.Random) -> tuple[list[_StageTime], datetime]:
    """Each core stage's run, one after the other from ``started`` with small gaps; and when the
    iteration finished."""
    clock, times = started, []
    for stage in CORE_STAGES:
        if stage in FIXED_TIME_STAGES:  # draws nothing, so the seeded lineage is what it was before the stage existed
            seconds = STAGE_SECONDS[stage]
            times.append(_StageTime(stage, clock, clock + timedelta(seconds=seconds), seconds))
            clock += timedelta(seconds=seconds)
            continue
        seconds = STAGE_SECONDS[stage] * rng.uniform(0.7, 1.4)
        times.append(_StageTime(stage, clock, clock + timedelta(seconds=seconds), seconds))
        clock += timedelta(seconds=seconds + rng.uniform(0.05, 0.3))
    return times, clock


def _judgment_rows(rows: _Rows, draw: _Draw, response_id: int, judgments: int, tally: _Tally, rng: random.Random) -> None:
    for sample in range(JUDGE_SAMPLES):
        if tally.judged >= judgments:
            break
        score = _score(rng, draw.quality)
        tally.scores.append(score)
        rows.add(
            Judgment, iteration_id=draw.number, response_id=response_id, sample_index=sample,
            raw_output=f"The answer is relevant and mostly complete. Score: {score}" if score else "I cannot tell.",
            score=score, parse_error=None if score else "no score statement",
        )
        tally.judged += 1


def _response_rows(rows: _Rows, state: _State, draw: _Draw, prompt_id: int, judgments: int, tally: _Tally, rng: random.Random) -> list[tuple[int, str]]:
    """The policy samples (judged) and the RLCD pair of one prompt; their ids and kinds."""
    kinds = ["policy"] * POLICY_SAMPLES + ["rlcd_positive", "rlcd_negative"]
    response_ids = []
    for index, kind in enumerate(kinds):
        response_id = state.next_response_id
        state.next_response_id += 1
        tokens = int(rng.gauss(90 + 60 * draw.quality, 25)) if kind == "policy" else int(rng.gauss(110, 30))
        tokens = max(4, tokens)
        tally.tokens += tokens
        tally.responses += 1
        rows.add(
            Response, id=response_id, iteration_id=draw.number, prompt_id=prompt_id, kind=kind,
            principle=None if kind == "policy" else "helpful-vs-evasive", sample_index=index if kind == "policy" else 0,
            text=f"answer {response_id}: " + "step by step, " * 4 + "done.", num_tokens=tokens,
        )
        response_ids.append((response_id, kind))
        if kind == "policy":
            _judgment_rows(rows, draw, response_id, judgments, tally, rng)
    return response_ids


def _pair_rows(rows: _Rows, draw: _Draw, prompt_id: int, response_ids: list[tuple[int, str]], tally: _Tally, rng: random.Random) -> None:
    """Always the RLCD pair; a self-reward pair for most prompts."""
    policy = [r for r, k in response_ids if k == "policy"]
    positive = next(r for r, k in response_ids if k == "rlcd_positive")
    negative = next(r for r, k in response_ids if k == "rlcd_negative")
    rows.add(Pair, iteration_id=draw.number, prompt_id=prompt_id, chosen_response_id=positive, rejected_response_id=negative, kind="rlcd", score_gap=None)
    tally.pairs += 1
    if rng.random() < 0.6:
        rows.add(Pair, iteration_id=draw.number, prompt_id=prompt_id, chosen_response_id=policy[0], rejected_response_id=policy[-1], kind="self_reward", score_gap=round(rng.uniform(0.5, 3), 2))
        tally.pairs += 1


def _prompt_rows(rows: _Rows, state: _State, draw: _Draw, n_prompts: int, judgments: int, rng: random.Random) -> _Tally:
    tally = _Tally()
    for p in range(n_prompts):
        prompt_id = state.next_prompt_id
        state.next_prompt_id += 1
        text_ = draw.prompts[(draw.number * 7 + p) % len(draw.prompts)]
        rows.add(Prompt, id=prompt_id, iteration_id=draw.number, text=text_, role="train", source="generated" if rng.random() < draw.quality else "seed")
        response_ids = _response_rows(rows, state, draw, prompt_id, judgments, tally, rng)
        _pair_rows(rows, draw, prompt_id, response_ids, tally, rng)
    return tally


def _gate_stats(state: _State, quality: float, rng: random.Random) -> gate.GateStats:
    """Held-out comparisons won at the drifting ``state.skill``."""
    state.skill = min(0.9, max(0.2, state.skill + rng.uniform(-0.04, 0.045)))
    outcomes = [rng.random() for _ in range(HELDOUT)]
    wins = sum(o < state.skill for o in outcomes)
    ties = sum(state.skill <= o < state.skill + 0.1 for o in outcomes)
    unparseable = rng.randint(0, 2)
    losses = HELDOUT - wins - ties - unparseable
    if losses < 0:
        ties, losses = max(0, ties + losses), 0
    return gate.GateStats(wins, losses, ties, unparseable, 100 + 40 * quality, 100.0)


def _stage_results(draw: _Draw, n_prompts: int, tally: _Tally, times: dict[str, _StageTime], decision: gate.GateDecision, decision_name: str, loss: float, margin: float) -> dict[str, dict[str, Any]]:
    parsed = [s for s in tally.scores if s is not None]
    judged = tally.judged
    dpo: dict[str, Any] = (
        {"skipped": "0 pairs, fewer than training.min_pairs=1", "pairs": 0} if draw.candidate is None
        else {"checkpoint_id": draw.candidate, "pairs": tally.pairs, "train_seconds": round(times["dpo_update"].seconds, 3), "steps": 8.0, "loss": round(loss, 6), "rewards/margins": round(margin, 6), "rewards/accuracies": round(min(1.0, 0.5 + draw.quality / 2), 6), "final_rewards/margins": round(margin * 1.2, 6)}
    )
    return {
        "generate_prompts": {"generated": n_prompts, "from_seed": 0, "heldout": HELDOUT, "parsed": n_prompts + 3, "filtered_out": 2, "duplicates": 1},
        "respond": {"responses": tally.responses, "policy": n_prompts * POLICY_SAMPLES, "rlcd_positive": n_prompts, "rlcd_negative": n_prompts, "mean_tokens": round(tally.tokens / tally.responses, 2)},
        "judge": {"judgments": judged, "unparseable": judged - len(parsed), "parse_failure_rate": round((judged - len(parsed)) / judged, 4) if judged else 0.0, "mean_score": round(sum(parsed) / len(parsed), 4) if parsed else None},
        "build_pairs": {"pairs": tally.pairs, "self_reward_pairs": tally.pairs - n_prompts, "rlcd_pairs": n_prompts},
        "dpo_update": dpo,
        "evaluate_gate": {"decision": decision_name, **decision.as_dict()},
        "evaluate_suites": {"evaluated": [], "skipped": "no promotion"},
    }


def _gate_rows(rows: _Rows, state: _State, draw: _Draw, stats: gate.GateStats, decision: gate.GateDecision, finished: datetime, trained_at: datetime, loss: float, margin: float) -> None:
    """The candidate checkpoint, its evaluation and the gate's event; a promotion moves the champion."""
    number, parent, candidate = draw.number, draw.parent, draw.candidate
    if candidate is None:
        rows.add(Evaluation, iteration_id=number, candidate_id=None, champion_id=parent, promote=False, wins=0, losses=0, ties=0, unparseable=0, win_rate=None, win_rate_lower_bound=None, length_ratio=None, parse_failure_rate=None, reasons={"reasons": ["no candidate checkpoint: too few preference pairs to train"]}, comparisons={"items": []}, created_at=finished)
        return
    promoted = decision.promote
    comparisons = [{"prompt": draw.prompts[(number + k) % len(draw.prompts)], "candidate_first": "A", "champion_first": "B", "outcome": "candidate"} for k in range(3)]
    rows.add(Checkpoint, id=candidate, parent_id=parent, base_model=BASE_MODEL, path=f"/data/artifacts/checkpoints/{candidate}", adapter_path=f"/data/artifacts/checkpoints/{candidate}/adapter", status=CheckpointStatus.champion if promoted else CheckpointStatus.rejected, created_iteration_id=number, metrics={"loss": loss, "rewards/margins": margin}, created_at=trained_at)
    rows.add(Evaluation, iteration_id=number, candidate_id=candidate, champion_id=parent, promote=promoted, wins=stats.wins, losses=stats.losses, ties=stats.ties, unparseable=stats.unparseable, win_rate=decision.win_rate, win_rate_lower_bound=decision.win_rate_lower_bound, length_ratio=decision.length_ratio, parse_failure_rate=decision.parse_failure_rate, reasons={"reasons": list(decision.reasons)}, comparisons={"items": comparisons}, created_at=finished)
    kind = lineage.GATE_PROMOTION_EVENT if promoted else "rejection"
    rows.add(Event, kind=kind, checkpoint_id=candidate, previous_checkpoint_id=parent if promoted else None, iteration_id=number, actor="gate", reason="; ".join(decision.reasons), created_at=finished)
    if promoted:
        state.champion = candidate


def _iteration_rows(rows: _Rows, state: _State, number: int, judgments: int, started: datetime, rng: random.Random, prompts: list[str], config: dict[str, Any], rule: gate.GateRule) -> None:
    skipped = rng.random() < 0.03  # too few pairs to train: no candidate
    quality = min(0.95, 0.2 + number / (number + 400) * 0.6 + rng.uniform(-0.05, 0.05))
    draw = _Draw(number, state.champion, None if skipped else lineage.candidate_checkpoint_id(number), quality, prompts)
    # judgments go to policy responses, JUDGE_SAMPLES each: enough prompts to carry `judgments`
    n_prompts = max(1, math.ceil(judgments / (POLICY_SAMPLES * JUDGE_SAMPLES)))
    stage_times, finished = _stage_times(started, rng)
    times = {t.stage: t for t in stage_times}
    tally = _prompt_rows(rows, state, draw, n_prompts, judgments, rng)
    stats = _gate_stats(state, quality, rng)
    decision = gate.decide(stats, rule)
    decision_name = "skipped" if skipped else ("promoted" if decision.promote else "rejected")
    loss = max(0.05, 0.6931 - 0.25 * quality + rng.gauss(0, 0.04))
    margin = max(0.0, 0.3 + 1.2 * quality + rng.gauss(0, 0.1))
    results = _stage_results(draw, n_prompts, tally, times, decision, decision_name, loss, margin)
    rows.add(Iteration, id=number, parent_checkpoint_id=draw.parent, candidate_checkpoint_id=draw.candidate, status=IterationStatus.completed, decision=decision_name, config_snapshot=config, error=None, started_at=started, finished_at=finished)
    for t in stage_times:
        rows.add(StageRun, iteration_id=number, stage=t.stage, status=StageStatus.succeeded, attempts=1, result=results[t.stage], error=None, compute_seconds=round(t.seconds, 3), queued_at=t.started, started_at=t.started, finished_at=t.finished)
    _gate_rows(rows, state, draw, stats, decision, finished, times["dpo_update"].finished, loss, margin)


# ---------------------------------------------------------------- the whole lineage


def _gate_rule(settings: Settings) -> gate.GateRule:
    g = settings.gate
    return gate.GateRule(min_win_rate_lower_bound=g.min_win_rate_lower_bound, z=g.z, min_comparisons=g.min_comparisons, max_length_ratio=g.max_length_ratio, max_parse_failure_rate=g.max_parse_failure_rate)


def _initial_rows(conn: Connection, clock: datetime) -> None:
    """The initial checkpoint as champion, as `kaizen init` leaves it."""
    initial = lineage.INITIAL_CHECKPOINT_ID
    conn.execute(_table("checkpoints").insert(), [{"id": initial, "parent_id": None, "base_model": BASE_MODEL, "path": f"/models/{BASE_MODEL}", "adapter_path": None, "status": CheckpointStatus.champion, "created_iteration_id": None, "metrics": {}, "created_at": clock - timedelta(hours=1)}])
    conn.execute(_table("champion").insert(), [{"id": lineage.CHAMPION_ROW_ID, "checkpoint_id": initial, "updated_at": clock}])
    conn.execute(_table("events").insert(), [{"kind": lineage.INITIAL_EVENT, "checkpoint_id": initial, "actor": "kaizen init", "reason": f"initial model {BASE_MODEL}", "created_at": clock - timedelta(hours=1)}])


def _final_champions(conn: Connection, champions: list[str], dialect: str) -> None:
    """One champion, former ones retired, the pointer and the stack a rollback walks back through."""
    checkpoints = _table("checkpoints")
    conn.execute(checkpoints.update().where(checkpoints.c.id.in_(champions[:-1])).values(status=CheckpointStatus.retired))
    conn.execute(_table("champion").update().values(checkpoint_id=champions[-1]))
    conn.execute(_table("champion_stack").insert(), [{"position": i, "checkpoint_id": c, "event_id": None} for i, c in enumerate(champions)])
    if dialect == "postgresql":  # rows were inserted with explicit ids: move the sequences past them
        for name in ("iterations", "prompts", "responses"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))"))


def seed_lineage(
    engine: Engine, iterations: int, judgments_per_iteration: int, *, seed: int = 0, batch: int = 250,
    start: datetime | None = None, progress: Callable[[int], None] | None = None,
) -> SeedSummary:
    """Fill a migrated, empty lineage DB with ``iterations`` completed cycles.

    Champion changes follow the real gate rule (policies.gate.decide with the default settings);
    the champion pointer and statuses end consistent: one champion, former champions retired.
    """
    began = time.perf_counter()
    rng = random.Random(seed)
    settings = Settings()
    rule, config, prompts = _gate_rule(settings), settings.snapshot(), load_seed_prompts()
    clock = start or datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)
    state = _State(champion=lineage.INITIAL_CHECKPOINT_ID)
    counts: dict[str, int] = {}
    with engine.begin() as conn:
        _initial_rows(conn, clock)
    champions = [lineage.INITIAL_CHECKPOINT_ID]
    for first in range(1, iterations + 1, batch):
        rows = _Rows()
        for number in range(first, min(first + batch, iterations + 1)):
            _iteration_rows(rows, state, number, judgments_per_iteration, clock, rng, prompts, config, rule)
            if state.champion != champions[-1]:
                champions.append(state.champion)
            clock += timedelta(minutes=15)
        with engine.begin() as conn:
            rows.flush(conn, counts)
        if progress:
            progress(min(first + batch - 1, iterations))
    with engine.begin() as conn:
        _final_champions(conn, champions, engine.dialect.name)
    return SeedSummary(iterations, counts.get("judgments", 0), state.champion, counts, time.perf_counter() - began)
