"""A whole cycle on the tiny model, its resumption after a crash, and stage idempotency."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from daemon.bootstrap import initialise
from daemon.cycle import PARKED_EVENT, CycleError, run_cycle
from daemon.db import lineage
from daemon.db.models import Checkpoint, Evaluation, Event, Iteration, IterationStatus, Judgment, Pair, Prompt, Response, StageRun, StageStatus
from daemon.dispatch import EagerDispatcher
from tests.factories import small_cycle_settings
from workers.checkpoints import read_manifest
from daemon.stage_runner import execute_stage
from daemon.stage_runs import StageContext
from daemon.stage_specs import CORE_STAGES, stage_function

pytestmark = pytest.mark.slow


class RecordingDispatcher(EagerDispatcher):
    """Runs stages in-process, records which ran, and can crash before a chosen stage."""

    def __init__(self, settings, sessions, crash_at: str | None = None) -> None:
        super().__init__(settings, sessions)
        self.crash_at = crash_at
        self.ran: list[str] = []

    def run_stage(self, iteration_id: int, stage: str):
        if stage == self.crash_at:
            raise RuntimeError("worker died")
        self.ran.append(stage)
        return super().run_stage(iteration_id, stage)


@pytest.fixture()
def env(tmp_path: Path, tiny_model_dir: Path):
    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir)
    return settings, initialise(settings)


def _count(session, model) -> int:
    return session.scalar(select(func.count()).select_from(model))


def test_a_full_cycle_records_every_stage_and_a_decision(env) -> None:
    settings, sessions = env
    report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        iteration = session.get(Iteration, report.iteration_id)
        assert iteration.status == IterationStatus.completed
        assert iteration.decision in {"promoted", "rejected", "skipped"}
        stages = {r.stage: r for r in session.scalars(select(StageRun))}
        assert set(stages) == set(CORE_STAGES)
        assert all(r.status == StageStatus.succeeded and r.compute_seconds > 0 for r in stages.values())
        assert _count(session, Prompt) == settings.prompts.per_cycle + settings.gate.heldout_prompts
        # the default strategy (verified+self_reward+rlcd): N policy samples + one positive and one negative RLCD answer per prompt
        assert _count(session, Response) == settings.prompts.per_cycle * (settings.respond.num_samples + 2)
        pairs = _count(session, Pair)
        assert pairs == stages["build_pairs"].result["pairs"] >= settings.prompts.per_cycle - 1
        evaluation = session.scalars(select(Evaluation)).one()
        champion = lineage.current_champion(session)
        expected_champion = iteration.candidate_checkpoint_id if evaluation.promote else iteration.parent_checkpoint_id
        assert champion.id == expected_champion
    assert report.orchestration_seconds >= 0


def test_an_interrupted_cycle_resumes_without_rerunning_finished_stages(env) -> None:
    settings, sessions = env
    crashing = RecordingDispatcher(settings, sessions, crash_at="judge")
    with pytest.raises(CycleError, match="judge"):
        run_cycle(sessions, settings, crashing)
    assert crashing.ran == ["generate_prompts", "respond"]
    with sessions() as session:
        prompts_before = _count(session, Prompt)
        responses_before = _count(session, Response)

    resumed = RecordingDispatcher(settings, sessions)
    report = run_cycle(sessions, settings, resumed)
    assert report.resumed_from == "judge"
    assert resumed.ran == ["judge", "build_pairs", "dpo_update", "evaluate_gate", "evaluate_suites"]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Iteration)) == 1
        assert _count(session, Prompt) == prompts_before
        assert _count(session, Response) == responses_before
        attempts = dict(session.execute(select(StageRun.stage, StageRun.attempts)).all())
        assert attempts["generate_prompts"] == attempts["respond"] == 1


def test_rerunning_a_finished_stage_returns_the_stored_result_and_writes_nothing(env) -> None:
    settings, sessions = env
    run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        before = {m.__tablename__: _count(session, m) for m in (Prompt, Response, Pair, Evaluation)}
        stored = session.scalars(select(StageRun).where(StageRun.stage == "respond")).one().result
    ctx = StageContext(settings=settings, sessions=sessions, iteration_id=1)
    for stage in CORE_STAGES:
        result = execute_stage(ctx, stage, stage_function(stage))
        if stage == "respond":
            assert result == stored
    with sessions() as session:
        assert {m.__tablename__: _count(session, m) for m in (Prompt, Response, Pair, Evaluation)} == before
        assert set(session.scalars(select(StageRun.attempts))) == {1}


def test_a_stage_that_keeps_failing_parks_its_iteration(env) -> None:
    settings, sessions = env

    def broken(_ctx):
        raise ValueError("model exploded")

    ctx = StageContext(settings=settings, sessions=sessions, iteration_id=0)

    class Broken(EagerDispatcher):
        def run_stage(self, iteration_id, stage):
            ctx.iteration_id = iteration_id
            return execute_stage(ctx, stage, broken)

    for _ in range(settings.worker.max_stage_attempts):
        with pytest.raises(CycleError, match="model exploded"):
            run_cycle(sessions, settings, Broken(settings, sessions))
    with sessions() as session:
        iteration = session.scalars(select(Iteration)).one()
        assert iteration.status == IterationStatus.failed
        assert "generate_prompts failed 3 times" in iteration.error
        parked = session.scalars(select(Event).where(Event.kind == PARKED_EVENT)).one()
        assert parked.iteration_id == iteration.id and parked.reason == iteration.error
        row = session.scalars(select(StageRun).where(StageRun.stage == "generate_prompts")).one()
        assert row.status == StageStatus.failed and "model exploded" in row.error


# --- Judge modes, judge metrics, length control, DPO reference ---------------------------


def _stage_results(session, iteration_id: int) -> dict[str, dict]:
    return {r.stage: r.result for r in session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id))}


def _warnings(session) -> list[str]:
    return list(session.scalars(select(Event.reason).where(Event.kind == "judge_warning").order_by(Event.id)))


def test_logprob_judging_scores_every_answer_and_records_the_judge_metrics(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = small_cycle_settings(
        tmp_path / "data", tiny_model_dir,
        judge={"mode": "logprob"}, pairs={"max_length_ratio": 1.0, "length_normalise": True},
    )
    sessions = initialise(settings)
    report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        judgments = list(session.scalars(select(Judgment)))
        responses = {r.id: r for r in session.scalars(select(Response))}
        stored_pairs = list(session.scalars(select(Pair)))
        results = _stage_results(session, report.iteration_id)
    policy = [r for r in responses.values() if r.kind == "policy"]
    assert len(judgments) == len(policy)  # one exact judgment per answer, whatever judge.num_samples
    assert all(j.score is not None and 1.0 <= j.score <= 5.0 for j in judgments)
    assert all(j.raw_output.startswith("logprob judge: P(1)=") for j in judgments)
    judge_metrics = results["judge"]["judge_metrics"]
    assert judge_metrics["parse_failure_rate"] == 0.0
    assert judge_metrics["self_agreement_basis"] == "distribution"
    assert 0.2 <= judge_metrics["self_agreement"] <= 1.0  # sum of p^2 over 5 scores is at least 1/5
    assert "length_correlation" in judge_metrics
    pair_metrics = results["build_pairs"]["judge_metrics"]
    assert set(pair_metrics) == {"mean_score_gap", "mean_length_gap"}
    # The cap at 1.0 keeps no pair whose chosen answer is longer than its rejected one.
    assert all(responses[p.chosen_response_id].num_tokens <= responses[p.rejected_response_id].num_tokens for p in stored_pairs)
    assert results["build_pairs"]["pairs"] == len(stored_pairs)
    assert results["build_pairs"]["length_normalised"] is True
    assert results["dpo_update"]["checkpoint_id"], "premise: RLCD pairs survive the cap and train a candidate"
    gate_metrics = results["evaluate_gate"]["judge_metrics"]
    assert 0.0 <= gate_metrics["position_bias_rate"] <= 1.0  # logprob verdicts are always read
    assert results["evaluate_gate"]["parse_failure_rate"] == 0.0


def test_text_judging_records_parse_failures_and_raises_a_warning_event(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The random tiny model never writes "Score: N": every text judgment fails to parse.
    settings = small_cycle_settings(
        tmp_path / "data", tiny_model_dir,
        judge={"mode": "text", "num_samples": 2, "warnings": {"max_parse_failure_rate": 0.5}},
    )
    sessions = initialise(settings)
    report = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        results = _stage_results(session, report.iteration_id)
        warnings = _warnings(session)
    judge_metrics = results["judge"]["judge_metrics"]
    assert judge_metrics["parse_failure_rate"] == results["judge"]["parse_failure_rate"] == 1.0
    assert judge_metrics["self_agreement"] is None  # no response has two parsed samples
    assert judge_metrics["length_correlation"] is None  # nothing scored
    assert results["build_pairs"]["judge_metrics"]["mean_score_gap"] is None  # RLCD pairs only
    assert any(w.startswith("judge parse-failure rate 100% > 50%") for w in warnings)
    assert results["judge"]["warnings"] == [w for w in warnings if w.startswith("judge parse-failure")]


def test_reference_initial_keeps_the_first_checkpoint_as_reference_in_the_second_iteration(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # A gate that promotes any candidate with a usable comparison, so iteration 2 trains a new champion.
    lenient_gate = {"min_win_rate_lower_bound": 0.0, "min_comparisons": 1, "max_length_ratio": 1000.0, "max_parse_failure_rate": 1.0}
    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir, training={"reference": "initial"}, gate=lenient_gate)
    sessions = initialise(settings)
    first = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    second = run_cycle(sessions, settings, EagerDispatcher(settings, sessions))
    with sessions() as session:
        initial = session.get(Checkpoint, lineage.INITIAL_CHECKPOINT_ID)
        iterations = {i.id: i for i in session.scalars(select(Iteration))}
        results = {i: _stage_results(session, i) for i in iterations}
    assert first.decision == "promoted", "premise: iteration 1 must promote for iteration 2 to train a new champion"
    assert iterations[second.iteration_id].parent_checkpoint_id == iterations[first.iteration_id].candidate_checkpoint_id
    assert results[first.iteration_id]["dpo_update"]["reference"] == initial.id
    assert results[second.iteration_id]["dpo_update"]["reference"] == initial.id
    candidate = iterations[second.iteration_id].candidate_checkpoint_id
    manifest = read_manifest(settings.artifacts_dir / "checkpoints" / candidate)
    assert manifest.metadata["parent"] != initial.path
    assert manifest.metadata["reference"] == initial.path  # a separate reference model, not the parent
    first_manifest = read_manifest(settings.artifacts_dir / "checkpoints" / iterations[first.iteration_id].candidate_checkpoint_id)
    assert first_manifest.metadata["reference"] == "adapter_disabled_parent"  # the parent is the initial model
