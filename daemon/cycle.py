"""One iteration as a state machine over the stages, recorded in the lineage DB.

Every transition is a row update, so a daemon restarted mid-cycle finds the running iteration
and resumes at its first unfinished stage; finished stages are never run again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.db import lineage
from daemon.db.engine import retry_while_unreachable, transaction
from daemon.db.models import Event, Iteration, IterationStatus, StageRun, StageStatus, utcnow
from daemon.stage_specs import STAGE_ORDER, stages_for

log = structlog.get_logger(__name__)

PARKED_EVENT = "parked"

ProgressFn = Callable[[str, str], None]
T = TypeVar("T")


class StageDispatcher(Protocol):
    def run_stage(self, iteration_id: int, stage: str) -> dict[str, Any]: ...


class CycleError(Exception):
    """A cycle could not finish; the message says which stage and why."""


class CycleStopped(Exception):
    """The daemon is stopping (SIGTERM, SIGINT): the iteration stays running and resumes on the next start."""


@dataclass
class CycleReport:
    iteration_id: int
    decision: str | None
    wall_seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None

    @property
    def orchestration_seconds(self) -> float:
        return max(0.0, self.wall_seconds - sum(self.stage_seconds.values()))


def _running_iteration(session: Session) -> Iteration | None:
    return session.scalars(
        select(Iteration).where(Iteration.status == IterationStatus.running).order_by(Iteration.id).limit(1)
    ).one_or_none()


def start_or_resume_iteration(sessions: sessionmaker[Session], settings: Settings) -> tuple[int, bool]:
    """Return (iteration id, resumed?): the unfinished iteration if any, else a new one.

    The champion row is locked *before* looking for a running iteration: two processes starting
    a cycle at once (a daemon that lost its leader lock, `kaizen cycle` beside a daemon) are
    serialised on that lock, and the second one sees the first one's iteration and resumes it
    instead of starting another. (SQLite serialises the whole transaction with BEGIN IMMEDIATE.)
    """
    with transaction(sessions) as session:
        champion = lineage.current_champion(session, for_update=True)
        running = _running_iteration(session)
        if running is not None:
            return running.id, True
        if champion is None:
            raise CycleError("no champion checkpoint: run `kaizen init` first")
        iteration = Iteration(
            parent_checkpoint_id=champion.id, status=IterationStatus.running, config_snapshot=settings.snapshot()
        )
        session.add(iteration)
        session.flush()
        session.add_all(StageRun(iteration_id=iteration.id, stage=s, status=StageStatus.pending, attempts=0, result={}) for s in stages_for(settings))
        return iteration.id, False


def _stage_rows(session: Session, iteration_id: int) -> dict[str, StageRun]:
    rows = session.scalars(select(StageRun).where(StageRun.iteration_id == iteration_id))
    return {row.stage: row for row in rows}


def _stage_statuses(sessions: sessionmaker[Session], iteration_id: int) -> dict[str, StageStatus]:
    with sessions() as session:
        return {stage: row.status for stage, row in _stage_rows(session, iteration_id).items()}


def _mark_queued(sessions: sessionmaker[Session], iteration_id: int, stage: str) -> None:
    with transaction(sessions) as session:
        row = _stage_rows(session, iteration_id)[stage]
        row.queued_at = utcnow()


def _finish_iteration(sessions: sessionmaker[Session], iteration_id: int, status: IterationStatus, error: str | None = None) -> str | None:
    with transaction(sessions) as session:
        iteration = session.get(Iteration, iteration_id)
        assert iteration is not None
        iteration.status = status
        iteration.error = error
        iteration.finished_at = utcnow()
        return iteration.decision


def _retrying(settings: Settings, fn: Callable[[], T], what: str) -> T:
    return retry_while_unreachable(fn, what, settings.schedule.db_outage_seconds)


def run_cycle(
    sessions: sessionmaker[Session], settings: Settings, dispatcher: StageDispatcher, progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CycleReport:
    started = time.perf_counter()
    # The tick's first writes and reads: retried through a DB blip like every call below.
    iteration_id, resumed = _retrying(settings, lambda: start_or_resume_iteration(sessions, settings), "starting the iteration")
    bound = log.bind(iteration_id=iteration_id)
    statuses = _retrying(settings, lambda: _stage_statuses(sessions, iteration_id), "reading the stage rows")
    order = [s for s in STAGE_ORDER if s in statuses]  # the stages this iteration was started with
    pending = [s for s in order if statuses[s] != StageStatus.succeeded]
    resumed_from = pending[0] if resumed and pending else None
    bound.info("cycle.started", resumed=resumed, resume_at=resumed_from)
    for stage in order:
        if stage not in pending:
            if progress:
                progress(stage, "skipped")
            continue
        if should_stop and should_stop():  # no new stage starts once the daemon is stopping
            raise CycleStopped(f"iteration {iteration_id} resumes at {stage}")
        if progress:
            progress(stage, "running")
        _retrying(settings, lambda: _mark_queued(sessions, iteration_id, stage), f"queueing {stage}")
        try:
            dispatcher.run_stage(iteration_id, stage)
        except Exception as exc:
            if should_stop and should_stop():  # interrupted by the stop, not failed: nothing is counted
                raise CycleStopped(f"iteration {iteration_id} resumes at {stage}") from exc
            _give_up_if_exhausted(sessions, settings, iteration_id, stage, exc)
            raise CycleError(f"iteration {iteration_id}: stage {stage} failed: {exc}") from exc
        if progress:
            progress(stage, "done")
    decision = _retrying(settings, lambda: _finish_iteration(sessions, iteration_id, IterationStatus.completed), "finishing the iteration")
    with sessions() as session:
        stage_seconds = {s: r.compute_seconds or 0.0 for s, r in _stage_rows(session, iteration_id).items() if s in pending}
    report = CycleReport(iteration_id, decision, time.perf_counter() - started, stage_seconds, resumed_from)
    bound.info("cycle.finished", decision=decision, seconds=round(report.wall_seconds, 2), orchestration_seconds=round(report.orchestration_seconds, 3))
    return report


def _give_up_if_exhausted(sessions: sessionmaker[Session], settings: Settings, iteration_id: int, stage: str, exc: Exception) -> None:
    """A stage that keeps failing parks its iteration (with an event) instead of looping forever."""
    with transaction(sessions) as session:
        iteration = session.get(Iteration, iteration_id, with_for_update=True)
        attempts = _stage_rows(session, iteration_id)[stage].attempts
        if iteration is None or iteration.status != IterationStatus.running or attempts < settings.worker.max_stage_attempts:
            return  # still retried, or already failed for good by a worker (stage_gave_up)
        iteration.status = IterationStatus.failed
        iteration.error = f"{stage} failed {attempts} times: {exc}"
        iteration.finished_at = utcnow()
        session.add(Event(kind=PARKED_EVENT, iteration_id=iteration_id, actor="daemon", reason=iteration.error))
    log.error("cycle.parked", iteration_id=iteration_id, stage=stage, attempts=attempts)
