"""A whole cycle on the tiny model, its resumption after a crash, and stage idempotency."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from daemon.bootstrap import initialise
from daemon.cycle import MAX_STAGE_ATTEMPTS, CycleError, run_cycle
from daemon.db import lineage
from daemon.db.models import Evaluation, Iteration, IterationStatus, Pair, Prompt, Response, StageRun, StageStatus
from daemon.dispatch import EagerDispatcher
from tests.factories import small_cycle_settings
from workers.stage_runner import StageContext, execute_stage
from workers.stages import STAGE_ORDER, STAGES

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
        assert set(stages) == set(STAGE_ORDER)
        assert all(r.status == StageStatus.succeeded and r.compute_seconds > 0 for r in stages.values())
        assert _count(session, Prompt) == settings.prompts.per_cycle + settings.gate.heldout_prompts
        # strategy "both": N policy samples + one positive and one negative RLCD answer per prompt
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
    assert resumed.ran == ["judge", "build_pairs", "dpo_update", "evaluate_gate"]
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
    for stage in STAGE_ORDER:
        result = execute_stage(ctx, stage, STAGES[stage])
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

    for _ in range(MAX_STAGE_ATTEMPTS):
        with pytest.raises(CycleError, match="model exploded"):
            run_cycle(sessions, settings, Broken(settings, sessions))
    with sessions() as session:
        iteration = session.scalars(select(Iteration)).one()
        assert iteration.status == IterationStatus.failed
        assert "generate_prompts failed 3 times" in iteration.error
        row = session.scalars(select(StageRun).where(StageRun.stage == "generate_prompts")).one()
        assert row.status == StageStatus.failed and "model exploded" in row.error
