"""A claim checks the iteration, and a stage whose workers keep dying is given up after the cap.

Stage functions here are plain callables (no model), the lineage DB a real SQLite file.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings, load_settings
from daemon.cycle import start_or_resume_iteration
from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
from daemon.db.models import Checkpoint, Event, Iteration, IterationStatus, StageRun, StageStatus, utcnow
from daemon.stage_runner import execute_stage
from daemon.stage_runs import GAVE_UP_EVENT, IterationNotRunning, StageContext, StageGaveUp, StageOutput

STAGE = "generate_prompts"


@pytest.fixture()
def lineage_db(tmp_path: Path) -> tuple[Settings, sessionmaker[Session], int]:
    settings = load_settings(None, data_dir=str(tmp_path / "data"), worker={"lease_seconds": 0.2, "max_stage_attempts": 3})
    upgrade_to_head(settings.resolved_database_url)
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    with transaction(sessions) as session:
        lineage.register_initial_champion(session, path=str(tmp_path / "model"), base_model="tiny", actor="test")
    iteration_id, _ = start_or_resume_iteration(sessions, settings)
    return settings, sessions, iteration_id


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, _ctx: StageContext) -> StageOutput:
        self.calls += 1
        return StageOutput({"prompts": 1})


def _set_iteration(sessions: sessionmaker[Session], iteration_id: int, status: IterationStatus) -> None:
    with transaction(sessions) as session:
        session.get(Iteration, iteration_id).status = status


def _row(sessions: sessionmaker[Session], iteration_id: int) -> StageRun:
    with sessions() as session:
        return session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id, StageRun.stage == STAGE)).one()


@pytest.mark.parametrize("status", [IterationStatus.failed, IterationStatus.completed])
def test_a_stage_of_an_iteration_that_is_not_running_is_never_claimed(lineage_db, status: IterationStatus) -> None:  # type: ignore[no-untyped-def]
    settings, sessions, iteration_id = lineage_db
    _set_iteration(sessions, iteration_id, status)
    stage = Recorder()
    with pytest.raises(IterationNotRunning, match=f"iteration {iteration_id} is {status.value}"):
        execute_stage(StageContext(settings, sessions, iteration_id), STAGE, stage)
    assert stage.calls == 0
    row = _row(sessions, iteration_id)
    assert row.status == StageStatus.pending and row.attempts == 0 and row.worker_id is None


def test_a_result_computed_while_the_iteration_was_parked_is_discarded(lineage_db) -> None:  # type: ignore[no-untyped-def]
    settings, sessions, iteration_id = lineage_db

    def parked_meanwhile(_ctx: StageContext) -> StageOutput:
        _set_iteration(sessions, iteration_id, IterationStatus.failed)  # the daemon parks it while we compute

        def write(session: Session) -> dict:
            session.add(Checkpoint(id="ckpt-0001", base_model="tiny", path="/nowhere", status="candidate", metrics={}))
            return {}

        return StageOutput({"prompts": 1}, write)

    with pytest.raises(IterationNotRunning):
        execute_stage(StageContext(settings, sessions, iteration_id), STAGE, parked_meanwhile)
    with sessions() as session:
        assert session.get(Checkpoint, "ckpt-0001") is None
    assert _row(sessions, iteration_id).status != StageStatus.succeeded


def _dead_worker_claim(sessions: sessionmaker[Session], iteration_id: int, attempts: int) -> None:
    """The row as a worker killed mid-stage leaves it: running, lease expired."""
    with transaction(sessions) as session:
        row = session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id, StageRun.stage == STAGE)).one()
        row.status = StageStatus.running
        row.attempts = attempts
        row.worker_id = "host:1:dead"
        row.lease_expires_at = utcnow() - timedelta(seconds=5)


def test_a_delivery_takes_over_below_the_attempt_cap(lineage_db) -> None:  # type: ignore[no-untyped-def]
    settings, sessions, iteration_id = lineage_db
    _dead_worker_claim(sessions, iteration_id, attempts=settings.worker.max_stage_attempts - 1)
    stage = Recorder()
    execute_stage(StageContext(settings, sessions, iteration_id), STAGE, stage)
    row = _row(sessions, iteration_id)
    assert stage.calls == 1 and row.status == StageStatus.succeeded and row.attempts == settings.worker.max_stage_attempts


def test_past_the_attempt_cap_the_stage_and_its_iteration_fail_for_good_with_an_event(lineage_db) -> None:  # type: ignore[no-untyped-def]
    settings, sessions, iteration_id = lineage_db
    cap = settings.worker.max_stage_attempts
    _dead_worker_claim(sessions, iteration_id, attempts=cap)
    stage = Recorder()
    with pytest.raises(StageGaveUp, match=f"claimed {cap} times"):
        execute_stage(StageContext(settings, sessions, iteration_id), STAGE, stage)
    assert stage.calls == 0
    row = _row(sessions, iteration_id)
    assert row.status == StageStatus.failed and row.attempts == cap and "failed for good" in row.error
    with sessions() as session:
        iteration = session.get(Iteration, iteration_id)
        assert iteration.status == IterationStatus.failed and iteration.error == row.error
        events = list(session.scalars(select(Event).where(Event.kind == GAVE_UP_EVENT)))
        assert [(e.iteration_id, e.reason) for e in events] == [(iteration_id, row.error)]
    # Any later delivery (Celery's requeue of the dead worker's message) is dropped, once and for all.
    with pytest.raises(IterationNotRunning):
        execute_stage(StageContext(settings, sessions, iteration_id), STAGE, stage)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Event).where(Event.kind == GAVE_UP_EVENT)) == 1
    assert stage.calls == 0
