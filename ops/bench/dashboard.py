"""How fast are the dashboard's queries on a big lineage? SQLite and PostgreSQL.

Seeds a synthetic lineage shaped like the real one (checkpoints, iterations with six stage runs
and their results, prompts, responses, judgments, pairs, gate evaluations, events) through the
migrated schema, then times each read the dashboard and /metrics make, in a fresh session per
call, and prints p50/p95 per query and backend. Target: p95 < 50 ms.

    .venv/bin/python -m ops.bench.dashboard                      # 10,000 iterations, 1,000,000 judgments
    .venv/bin/python -m ops.bench.dashboard --iterations 500 --judgments 50000 --backends sqlite

PostgreSQL: --postgres-url (default postgresql+psycopg://postgres@127.0.0.1:5432/kaizen_bench); the
database is dropped and created again. `seed_lineage` is also used by the dashboard tests and
ops/screenshot_dashboard.py to get a realistic lineage without running cycles.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.engine import make_url

from daemon.config import Settings
from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, upgrade_to_head
from daemon.db.models import (
    ChampionPointer, Checkpoint, CheckpointStatus, Evaluation, Event, Iteration, IterationStatus, Judgment, Pair, Prompt,
    Response, StageRun, StageStatus,
)
from policies import gate
from policies.self_instruct import load_seed_prompts
from daemon.stage_specs import CORE_STAGES

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/kaizen_bench"
TARGET_P95_MS = 50.0
POLICY_SAMPLES = 4  # respond.num_samples
JUDGE_SAMPLES = 2  # judge.num_samples
HELDOUT = 16
# Typical compute seconds of each stage on a real GPU model; the seeded values vary around them.
STAGE_SECONDS = {"generate_prompts": 40.0, "respond": 120.0, "judge": 150.0, "build_pairs": 0.8, "dpo_update": 300.0, "evaluate_gate": 90.0, "evaluate_suites": 0.5}
# A no-op without a promotion; added after the seeded lineage's shape was fixed by its rng draws.
FIXED_TIME_STAGES = ("evaluate_suites",)
TABLES = (Iteration, StageRun, Prompt, Response, Judgment, Pair, Checkpoint, Evaluation, Event)


# ---------------------------------------------------------------- a synthetic lineage


@dataclass
class SeedSummary:
    iterations: int
    judgments: int
    champion: str
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _State:
    champion: str
    next_prompt_id: int = 1
    next_response_id: int = 1
    skill: float = 0.45  # the true chance that a candidate beats its parent; drifts over time


class _Rows:
    """Rows for a batch of iterations, keyed by table, inserted in foreign-key order."""

    def __init__(self) -> None:
        self.by_table: dict[str, list[dict[str, Any]]] = {m.__tablename__: [] for m in TABLES}

    def add(self, model: type, **values: Any) -> None:
        self.by_table[model.__tablename__].append(values)

    def flush(self, conn: Connection, counts: dict[str, int]) -> None:
        # Checkpoints and iterations reference each other: checkpoints go in first without their
        # iteration, and the link is set once the iterations exist.
        checkpoints = self.by_table["checkpoints"]
        links = [(c["id"], c.pop("created_iteration_id")) for c in checkpoints]
        order = ("checkpoints", "iterations", "stage_runs", "prompts", "responses", "judgments", "pairs", "evaluations", "events")
        for name in order:
            rows = self.by_table[name]
            if rows:
                conn.execute(_table(name).insert(), rows)
                counts[name] = counts.get(name, 0) + len(rows)
        if links:
            table = _table("checkpoints")
            conn.execute(
                table.update().where(table.c.id == _bindparam("cid")).values(created_iteration_id=_bindparam("iid")),
                [{"cid": cid, "iid": iid} for cid, iid in links],
            )
        self.__init__()


def _table(name: str):  # type: ignore[no-untyped-def]
    from daemon.db.models import Base

    return Base.metadata.tables[name]


def _bindparam(name: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import bindparam

    return bindparam(name)


def _score(rng: random.Random, quality: float) -> float | None:
    if rng.random() < 0.08:
        return None  # an unparseable judgment: recorded, never imputed
    return float(min(5, max(1, round(rng.gauss(1.5 + 3 * quality, 0.9)))))


def _iteration_rows(rows: _Rows, state: _State, number: int, judgments: int, started: datetime, rng: random.Random, prompts: list[str], config: dict[str, Any], rule: gate.GateRule) -> None:
    skipped = rng.random() < 0.03
    candidate = lineage.candidate_checkpoint_id(number) if not skipped else None
    parent = state.champion
    quality = min(0.95, 0.2 + number / (number + 400) * 0.6 + rng.uniform(-0.05, 0.05))
    # judgments go to policy responses, JUDGE_SAMPLES each: enough prompts to carry `judgments`
    n_prompts = max(1, math.ceil(judgments / (POLICY_SAMPLES * JUDGE_SAMPLES)))
    clock = started
    stage_rows = []
    for stage in CORE_STAGES:
        if stage in FIXED_TIME_STAGES:  # draws nothing, so the seeded lineage is what it was before the stage existed
            stage_rows.append((stage, clock, clock + timedelta(seconds=STAGE_SECONDS[stage]), STAGE_SECONDS[stage]))
            clock += timedelta(seconds=STAGE_SECONDS[stage])
            continue
        seconds = STAGE_SECONDS[stage] * rng.uniform(0.7, 1.4)
        stage_rows.append((stage, clock, clock + timedelta(seconds=seconds), seconds))
        clock += timedelta(seconds=seconds + rng.uniform(0.05, 0.3))
    finished = clock

    judged, scores, token_total, responses = 0, [], 0, 0
    pair_rows = 0
    for p in range(n_prompts):
        prompt_id = state.next_prompt_id
        state.next_prompt_id += 1
        rows.add(Prompt, id=prompt_id, iteration_id=number, text=prompts[(number * 7 + p) % len(prompts)], role="train", source="generated" if rng.random() < quality else "seed")
        kinds = ["policy"] * POLICY_SAMPLES + ["rlcd_positive", "rlcd_negative"]
        response_ids = []
        for index, kind in enumerate(kinds):
            response_id = state.next_response_id
            state.next_response_id += 1
            tokens = int(rng.gauss(90 + 60 * quality, 25)) if kind == "policy" else int(rng.gauss(110, 30))
            tokens = max(4, tokens)
            token_total += tokens
            responses += 1
            rows.add(
                Response, id=response_id, iteration_id=number, prompt_id=prompt_id, kind=kind,
                principle=None if kind == "policy" else "helpful-vs-evasive", sample_index=index if kind == "policy" else 0,
                text=f"answer {response_id}: " + "step by step, " * 4 + "done.", num_tokens=tokens,
            )
            response_ids.append((response_id, kind))
            if kind == "policy":
                for sample in range(JUDGE_SAMPLES):
                    if judged >= judgments:
                        break
                    score = _score(rng, quality)
                    scores.append(score)
                    rows.add(
                        Judgment, iteration_id=number, response_id=response_id, sample_index=sample,
                        raw_output=f"The answer is relevant and mostly complete. Score: {score}" if score else "I cannot tell.",
                        score=score, parse_error=None if score else "no score statement",
                    )
                    judged += 1
        policy = [r for r, k in response_ids if k == "policy"]
        positive = next(r for r, k in response_ids if k == "rlcd_positive")
        negative = next(r for r, k in response_ids if k == "rlcd_negative")
        rows.add(Pair, iteration_id=number, prompt_id=prompt_id, chosen_response_id=positive, rejected_response_id=negative, kind="rlcd", score_gap=None)
        pair_rows += 1
        if rng.random() < 0.6:
            rows.add(Pair, iteration_id=number, prompt_id=prompt_id, chosen_response_id=policy[0], rejected_response_id=policy[-1], kind="self_reward", score_gap=round(rng.uniform(0.5, 3), 2))
            pair_rows += 1

    parsed = [s for s in scores if s is not None]
    state.skill = min(0.9, max(0.2, state.skill + rng.uniform(-0.04, 0.045)))
    outcomes = [rng.random() for _ in range(HELDOUT)]
    wins = sum(o < state.skill for o in outcomes)
    ties = sum(state.skill <= o < state.skill + 0.1 for o in outcomes)
    unparseable = rng.randint(0, 2)
    losses = HELDOUT - wins - ties - unparseable
    if losses < 0:
        ties, losses = max(0, ties + losses), 0
    stats = gate.GateStats(wins, losses, ties, unparseable, 100 + 40 * quality, 100.0)
    decision = gate.decide(stats, rule)
    promoted = decision.promote and not skipped
    decision_name = "skipped" if skipped else ("promoted" if promoted else "rejected")
    loss = max(0.05, 0.6931 - 0.25 * quality + rng.gauss(0, 0.04))
    margin = max(0.0, 0.3 + 1.2 * quality + rng.gauss(0, 0.1))
    results = {
        "generate_prompts": {"generated": n_prompts, "from_seed": 0, "heldout": HELDOUT, "parsed": n_prompts + 3, "filtered_out": 2, "duplicates": 1},
        "respond": {"responses": responses, "policy": n_prompts * POLICY_SAMPLES, "rlcd_positive": n_prompts, "rlcd_negative": n_prompts, "mean_tokens": round(token_total / responses, 2)},
        "judge": {"judgments": judged, "unparseable": judged - len(parsed), "parse_failure_rate": round((judged - len(parsed)) / judged, 4) if judged else 0.0, "mean_score": round(sum(parsed) / len(parsed), 4) if parsed else None},
        "build_pairs": {"pairs": pair_rows, "self_reward_pairs": pair_rows - n_prompts, "rlcd_pairs": n_prompts},
        "dpo_update": {"skipped": "0 pairs, fewer than training.min_pairs=1", "pairs": 0} if skipped else {"checkpoint_id": candidate, "pairs": pair_rows, "train_seconds": round(stage_rows[4][3], 3), "steps": 8.0, "loss": round(loss, 6), "rewards/margins": round(margin, 6), "rewards/accuracies": round(min(1.0, 0.5 + quality / 2), 6), "final_rewards/margins": round(margin * 1.2, 6)},
        "evaluate_gate": {"decision": decision_name, **decision.as_dict()},
        "evaluate_suites": {"evaluated": [], "skipped": "no promotion"},
    }
    rows.add(Iteration, id=number, parent_checkpoint_id=parent, candidate_checkpoint_id=candidate, status=IterationStatus.completed, decision=decision_name, config_snapshot=config, error=None, started_at=started, finished_at=finished)
    for stage, begin, end, seconds in stage_rows:
        rows.add(StageRun, iteration_id=number, stage=stage, status=StageStatus.succeeded, attempts=1, result=results[stage], error=None, compute_seconds=round(seconds, 3), queued_at=begin, started_at=begin, finished_at=end)
    comparisons = [{"prompt": prompts[(number + k) % len(prompts)], "candidate_first": "A", "champion_first": "B", "outcome": "candidate"} for k in range(3)]
    if skipped:
        rows.add(Evaluation, iteration_id=number, candidate_id=None, champion_id=parent, promote=False, wins=0, losses=0, ties=0, unparseable=0, win_rate=None, win_rate_lower_bound=None, length_ratio=None, parse_failure_rate=None, reasons={"reasons": ["no candidate checkpoint: too few preference pairs to train"]}, comparisons={"items": []}, created_at=finished)
        return
    rows.add(Checkpoint, id=candidate, parent_id=parent, base_model="my-instruct-model", path=f"/data/artifacts/checkpoints/{candidate}", adapter_path=f"/data/artifacts/checkpoints/{candidate}/adapter", status=CheckpointStatus.champion if promoted else CheckpointStatus.rejected, created_iteration_id=number, metrics={"loss": loss, "rewards/margins": margin}, created_at=stage_rows[4][2])
    rows.add(Evaluation, iteration_id=number, candidate_id=candidate, champion_id=parent, promote=promoted, wins=stats.wins, losses=stats.losses, ties=stats.ties, unparseable=stats.unparseable, win_rate=decision.win_rate, win_rate_lower_bound=decision.win_rate_lower_bound, length_ratio=decision.length_ratio, parse_failure_rate=decision.parse_failure_rate, reasons={"reasons": list(decision.reasons)}, comparisons={"items": comparisons}, created_at=finished)
    reason = "; ".join(decision.reasons)
    if promoted:
        rows.add(Event, kind=lineage.GATE_PROMOTION_EVENT, checkpoint_id=candidate, previous_checkpoint_id=parent, iteration_id=number, actor="gate", reason=reason, created_at=finished)
        state.champion = candidate
    else:
        rows.add(Event, kind="rejection", checkpoint_id=candidate, previous_checkpoint_id=None, iteration_id=number, actor="gate", reason=reason, created_at=finished)


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
    rule = gate.GateRule(min_win_rate_lower_bound=settings.gate.min_win_rate_lower_bound, z=settings.gate.z, min_comparisons=settings.gate.min_comparisons, max_length_ratio=settings.gate.max_length_ratio, max_parse_failure_rate=settings.gate.max_parse_failure_rate)
    config = settings.snapshot()
    prompts = load_seed_prompts()
    clock = start or datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)
    state = _State(champion=lineage.INITIAL_CHECKPOINT_ID)
    counts: dict[str, int] = {}
    with engine.begin() as conn:
        conn.execute(_table("checkpoints").insert(), [{"id": lineage.INITIAL_CHECKPOINT_ID, "parent_id": None, "base_model": "my-instruct-model", "path": "/models/my-instruct-model", "adapter_path": None, "status": CheckpointStatus.champion, "created_iteration_id": None, "metrics": {}, "created_at": clock - timedelta(hours=1)}])
        conn.execute(_table("champion").insert(), [{"id": lineage.CHAMPION_ROW_ID, "checkpoint_id": lineage.INITIAL_CHECKPOINT_ID, "updated_at": clock}])
        conn.execute(_table("events").insert(), [{"kind": lineage.INITIAL_EVENT, "checkpoint_id": lineage.INITIAL_CHECKPOINT_ID, "actor": "kaizen init", "reason": "initial model my-instruct-model", "created_at": clock - timedelta(hours=1)}])
    champions = [lineage.INITIAL_CHECKPOINT_ID]
    for first in range(1, iterations + 1, batch):
        rows = _Rows()
        for number in range(first, min(first + batch, iterations + 1)):
            before = state.champion
            _iteration_rows(rows, state, number, judgments_per_iteration, clock, rng, prompts, config, rule)
            if state.champion != before:
                champions.append(state.champion)
            clock += timedelta(minutes=15)
        with engine.begin() as conn:
            rows.flush(conn, counts)
        if progress:
            progress(min(first + batch - 1, iterations))
    with engine.begin() as conn:
        checkpoints = _table("checkpoints")
        conn.execute(checkpoints.update().where(checkpoints.c.id.in_(champions[:-1])).values(status=CheckpointStatus.retired))
        conn.execute(_table("champion").update().values(checkpoint_id=state.champion))
        # Every gate promotion pushed its checkpoint: the stack a rollback walks back through.
        conn.execute(_table("champion_stack").insert(), [{"position": i, "checkpoint_id": c, "event_id": None} for i, c in enumerate(champions)])
        if engine.dialect.name == "postgresql":
            for name in ("iterations", "prompts", "responses"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))"))
    judgments = counts.get("judgments", 0)
    return SeedSummary(iterations, judgments, state.champion, counts, time.perf_counter() - began)


# ---------------------------------------------------------------- the timed reads


def dashboard_queries(iterations: int, rng: random.Random) -> dict[str, Callable[[Any], Any]]:
    """Each read the dashboard (and /metrics) makes, as a function of a fresh session."""
    from daemon import views
    from daemon.dashboard import pages
    from daemon.metrics import LineageCollector

    settings = Settings()

    # One collector for all calls, as in a long-lived dashboard process: its first (warm-up) call
    # sums every finished stage run, later scrapes only what changed since.
    collector = LineageCollector(None)  # type: ignore[arg-type]

    def metrics_scrape(session):  # type: ignore[no-untyped-def]
        collector.sessions = lambda: _Borrowed(session)  # type: ignore[assignment]
        return list(collector.collect())

    return {
        "status (champion, pause, counts)": views.status_view,
        "lineage graph (60 newest checkpoints)": lambda s: views.lineage_graph(s, 60),
        "recent iterations + score histograms (50)": lambda s: views.recent_iterations(s, 50),
        "events (50 newest)": lambda s: views.recent_events(s, 50),
        "iteration detail (random iteration)": lambda s: views.iteration_detail(s, rng.randint(1, iterations)),
        "overview page context (all of the above + SVG)": lambda s: pages.overview_context(s, settings, 50, None, None),
        "/metrics scrape": metrics_scrape,
    }


class _Borrowed:
    """Lets the metrics collector use the benchmark's session as if it opened its own."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def __enter__(self) -> Any:
        return self.session

    def __exit__(self, *exc: Any) -> None:
        return None


def time_queries(engine: Engine, iterations: int, repeat: int, seed: int = 1) -> dict[str, list[float]]:
    sessions = make_session_factory(engine)
    rng = random.Random(seed)
    timings: dict[str, list[float]] = {}
    for name, query in dashboard_queries(iterations, rng).items():
        with sessions() as session:
            query(session)  # warm the connection pool and the DB cache once
        samples = []
        for _ in range(repeat):
            with sessions() as session:
                started = time.perf_counter()
                query(session)
                samples.append((time.perf_counter() - started) * 1000)
        timings[name] = samples
    return timings


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


# ---------------------------------------------------------------- backends


def _postgres_fresh(url: str) -> str:
    parsed = make_url(url)
    admin = make_engine(parsed.set(database="postgres").render_as_string(hide_password=False)).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()
    return url


def run_backend(name: str, url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    print(f"\n[{name}] {url}", flush=True)
    upgrade_to_head(url)
    engine = make_engine(url)
    per_iteration = max(1, args.judgments // args.iterations)

    def progress(done: int) -> None:
        if done % 2000 < 250 or done == args.iterations:
            print(f"  seeded {done}/{args.iterations} iterations", flush=True)

    if args.reuse:
        with make_session_factory(engine)() as session:
            print(f"  reusing {session.scalar(select(func.count()).select_from(Judgment)):,} judgments", flush=True)
    else:
        summary = seed_lineage(engine, args.iterations, per_iteration, seed=args.seed, progress=progress)
        print(f"  seeded in {summary.seconds:.0f}s: " + ", ".join(f"{k} {v:,}" for k, v in summary.rows.items()), flush=True)
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE"))  # what autovacuum does soon after a bulk load
        with make_session_factory(engine)() as session:
            assert session.scalar(select(func.count()).select_from(Judgment)) == summary.judgments
            assert session.scalar(select(ChampionPointer.checkpoint_id)) == summary.champion
    timings = time_queries(engine, args.iterations, args.repeat)
    engine.dispose()
    return timings


def report(results: dict[str, dict[str, list[float]]]) -> bool:
    ok = True
    width = max(len(q) for timings in results.values() for q in timings)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    # Timings on a shared machine move with its load; say what it was.
    print(f"\n{os.cpu_count()} CPUs, load average {load}")
    print(f"{'backend':<11} {'query':<{width}} {'p50 ms':>8} {'p95 ms':>8}  target p95 < {TARGET_P95_MS:.0f} ms")
    for backend, timings in results.items():
        for query, samples in timings.items():
            p50, p95 = percentile(samples, 50), percentile(samples, 95)
            verdict = "ok" if p95 < TARGET_P95_MS else "SLOW"
            ok &= p95 < TARGET_P95_MS
            print(f"{backend:<11} {query:<{width}} {p50:>8.1f} {p95:>8.1f}  {verdict}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--judgments", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=40, help="timed calls per query")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--sqlite-path", type=Path, default=None, help="default: a temporary file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="time the databases a previous run seeded (needs --sqlite-path)")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="kaizen-bench-") as scratch:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                path = args.sqlite_path or Path(scratch) / "lineage.db"
                if not args.reuse:
                    path.unlink(missing_ok=True)
                results["sqlite"] = run_backend("sqlite", f"sqlite:///{path}", args)
            elif backend == "postgresql":
                url = args.postgres_url if args.reuse else _postgres_fresh(args.postgres_url)
                results["postgresql"] = run_backend("postgresql", url, args)
            else:
                parser.error(f"unknown backend {backend!r}: sqlite or postgresql")
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
