"""The gate stage's suite route: a candidate that significantly improves a gate suite is promoted,
one that regresses another suite is refused, and the decision records every number.

The suite scores are fixed here (the evaluator is replaced) so the test controls the evidence;
everything after it is the real stage: paired bootstrap, policies.gate, lineage promotion."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from daemon.bootstrap import initialise
from daemon.cycle import run_cycle
from daemon.db import lineage
from daemon.db.models import Iteration, StageRun
from daemon.dispatch import EagerDispatcher
from tests.factories import small_cycle_settings
from workers import evaluation
# Imported before any test patches workers.evaluation.evaluate_checkpoint: these stage modules bind
# it by name at import, and a module first imported while the fake is in place would keep it.
from workers.stages import evaluate_gate, evaluate_suites  # noqa: F401

pytestmark = pytest.mark.slow

N = 120


def fake_rows(scores: dict[tuple[str, str], float]):
    """An evaluator whose checkpoint `ckpt-0000` (the initial champion) and candidates pass a fixed
    share of the suite's N items: the first round(share * N) items pass."""

    def evaluate(settings, sessions, checkpoint_id, suite, **_):
        role = "champion" if checkpoint_id == lineage.INITIAL_CHECKPOINT_ID else "candidate"
        passing = round(scores[(role, suite)] * N)
        items = [{"id": f"i{k}", "score": 1.0 if k < passing else 0.0, "tokens": 20} for k in range(N)]
        return SimpleNamespace(score=passing / N, n=N, items={"items": items})

    return evaluate


def run_gate(tmp_path: Path, tiny_model_dir: Path, monkeypatch, scores):
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", fake_rows(scores))
    settings = small_cycle_settings(
        tmp_path / "data", tiny_model_dir,
        gate={"pairwise": False, "suites": ["instruct-checks", "jsonl"], "improve_suites": ["instruct-checks"], "regression_tolerance": 0.02},
        eval={"suites": []},
    )
    sessions = initialise(settings)
    run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        iteration = session.scalars(select(Iteration)).one()
        gate_run = session.scalars(select(StageRun).where(StageRun.stage == "evaluate_gate")).one()
        return iteration, gate_run.result, lineage.current_champion(session).id


def test_a_significant_suite_improvement_promotes(tmp_path, tiny_model_dir, monkeypatch):
    scores = {("champion", "instruct-checks"): 0.20, ("candidate", "instruct-checks"): 0.40,
              ("champion", "jsonl"): 0.50, ("candidate", "jsonl"): 0.50}

    iteration, result, champion = run_gate(tmp_path, tiny_model_dir, monkeypatch, scores)

    assert iteration.decision == "promoted" and champion == iteration.candidate_checkpoint_id
    assert result["route"] == "suite"
    suite = next(s for s in result["suites"] if s["suite"] == "instruct-checks")
    assert suite["difference"] == pytest.approx(0.20) and suite["lower"] > 0
    assert suite["n"] == N and suite["minimum_detectable"] > 0


def test_kaizen_show_prints_the_cycle_signals_and_the_gate_suites(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from daemon.cli import app
    from daemon.logs import configure_logging

    scores = {("champion", "instruct-checks"): 0.20, ("candidate", "instruct-checks"): 0.40,
              ("champion", "jsonl"): 0.50, ("candidate", "jsonl"): 0.50}
    run_gate(tmp_path, tiny_model_dir, monkeypatch, scores)

    args = ["show", "1", "--data-dir", str(tmp_path / "data")]
    out = CliRunner().invoke(app, args).stdout
    signals = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)["signals"]
    configure_logging()

    with initialise_sessions(tmp_path) as session:
        results = {r.stage: r.result for r in session.scalars(select(StageRun))}
    assert signals["truncation_rate"] == results["respond"]["truncation_rate"] is not None
    assert signals["looping_rate"] == results["respond"]["looping_rate"] is not None
    assert signals["self_generated_share"] == results["generate_prompts"]["self_generated_share"] is not None
    assert signals["judge"] == results["judge"]["judge"] and signals["gate_route"] == "suite"
    assert "self-generated share" in out and "truncation rate" in out and "looping rate" in out and "debiased position bias" in out
    assert "gate suite instruct-checks: candidate 0.400 vs champion 0.200 (n=120), difference +0.200" in " ".join(out.split())


def test_a_regression_on_another_suite_refuses(tmp_path, tiny_model_dir, monkeypatch):
    scores = {("champion", "instruct-checks"): 0.20, ("candidate", "instruct-checks"): 0.40,
              ("champion", "jsonl"): 0.50, ("candidate", "jsonl"): 0.30}

    iteration, result, champion = run_gate(tmp_path, tiny_model_dir, monkeypatch, scores)

    assert iteration.decision == "rejected" and champion == lineage.INITIAL_CHECKPOINT_ID
    assert any(r.startswith("regression on jsonl") for r in result["reasons"])


def test_an_improvement_within_noise_does_not_promote(tmp_path, tiny_model_dir, monkeypatch):
    scores = {("champion", "instruct-checks"): 0.20, ("candidate", "instruct-checks"): 0.22,
              ("champion", "jsonl"): 0.50, ("candidate", "jsonl"): 0.50}

    iteration, result, _ = run_gate(tmp_path, tiny_model_dir, monkeypatch, scores)

    assert iteration.decision == "rejected"
    suite = next(s for s in result["suites"] if s["suite"] == "instruct-checks")
    assert suite["lower"] <= 0


def initialise_sessions(tmp_path: Path):
    from daemon.db.engine import make_engine, make_session_factory

    return make_session_factory(make_engine(f"sqlite:///{tmp_path / 'data' / 'lineage.db'}"))()
