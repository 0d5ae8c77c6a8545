"""/metrics' incremental stage totals stay equal to a full aggregate as cycles run and finish."""

from __future__ import annotations

from sqlalchemy import func, select

from daemon.db.engine import transaction
from daemon.db.models import Iteration, IterationStatus, StageRun, StageStatus
from daemon.metrics import StageTotals

from .conftest import Seeded


def _full_aggregate(seeded: Seeded) -> dict[str, tuple[int, float]]:
    with seeded.sessions() as session:
        rows = session.execute(
            select(StageRun.stage, func.count(), func.sum(StageRun.compute_seconds)).where(StageRun.status == StageStatus.succeeded).group_by(StageRun.stage)
        )
        return {stage: (count, round(total, 6)) for stage, count, total in rows}


def _scrape(totals: StageTotals, seeded: Seeded) -> dict[str, tuple[int, float]]:
    with seeded.sessions() as session:
        return {stage: (count, round(total, 6)) for stage, (count, total) in totals.totals(session).items()}


def test_stage_totals_follow_a_running_iteration_and_cache_finished_ones(seeded: Seeded) -> None:
    totals = StageTotals()
    assert _scrape(totals, seeded) == _full_aggregate(seeded)
    with transaction(seeded.sessions) as session:
        running = Iteration(parent_checkpoint_id=seeded.champion(), status=IterationStatus.running, config_snapshot={})
        session.add(running)
        session.flush()
        session.add(StageRun(iteration_id=running.id, stage="respond", status=StageStatus.succeeded, attempts=1, result={}, compute_seconds=2.5))
        session.add(StageRun(iteration_id=running.id, stage="judge", status=StageStatus.running, attempts=1, result={}))
        iteration_id = running.id
    assert _scrape(totals, seeded) == _full_aggregate(seeded)
    assert totals._watermark == iteration_id - 1  # the running iteration is not cached
    with transaction(seeded.sessions) as session:
        judge = session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id, StageRun.stage == "judge")).one()
        judge.status, judge.compute_seconds = StageStatus.succeeded, 4.0
        session.get(Iteration, iteration_id).status = IterationStatus.completed
    assert _scrape(totals, seeded) == _full_aggregate(seeded)
    assert totals._watermark == iteration_id
