"""`anchored` pairs (Temporal Self-Rewarding): once the champion is no longer the initial model,
respond also samples the initial model, and build_pairs takes the rejected answers from it."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from daemon.bootstrap import initialise
from daemon.cycle import run_cycle
from daemon.db.models import Iteration, Pair, Response
from daemon.dispatch import EagerDispatcher
from tests.factories import small_cycle_settings
from tests.workers.test_gate_suites import fake_rows
from workers import evaluation
# Imported before any test patches workers.evaluation.evaluate_checkpoint: these stage modules bind
# it by name at import, and a module first imported while the fake is in place would keep it.
from workers.stages import evaluate_gate, evaluate_suites  # noqa: F401

pytestmark = pytest.mark.slow


def test_after_a_promotion_rejected_answers_come_from_the_initial_model(tmp_path, tiny_model_dir, monkeypatch):
    # The gate promotes every candidate (a fixed suite improvement), so cycle 2 starts from a new champion.
    scores = {("champion", "instruct-checks"): 0.2, ("candidate", "instruct-checks"): 0.5}
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", fake_rows(scores))
    settings = small_cycle_settings(
        tmp_path / "data", tiny_model_dir,
        generation={"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0},
        prompts={"per_cycle": 8, "constraint_kinds": ["lowercase"], "top_up_from": "tasks"},
        respond={"num_samples": 4},
        pairs={"strategy": "anchored", "chosen_must_finish": False},
        judge={"backend": "verifier"},
        gate={"pairwise": False, "suites": ["instruct-checks"], "improve_suites": ["instruct-checks"]},
        eval={"suites": []},
    )
    sessions = initialise(settings)
    for _ in range(2):
        run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        first, second = session.scalars(select(Iteration).order_by(Iteration.id)).all()
        kinds = {it.id: set(session.scalars(select(Response.kind).where(Response.iteration_id == it.id))) for it in (first, second)}
        pairs = session.scalars(select(Pair).where(Pair.iteration_id == second.id)).all()
        rejected_kinds = {session.get(Response, p.rejected_response_id).kind for p in pairs}
        chosen_kinds = {session.get(Response, p.chosen_response_id).kind for p in pairs}
    assert first.decision == "promoted" and second.parent_checkpoint_id == first.candidate_checkpoint_id
    assert kinds[first.id] == {"policy"}  # the champion was the initial model: its own samples are the anchor
    assert kinds[second.id] == {"policy", "anchor"}
    assert pairs and rejected_kinds == {"anchor"} and chosen_kinds == {"policy"}
    assert {p.kind for p in pairs} == {"anchored"}
